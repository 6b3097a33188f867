"""A real OpenAI-compatible HTTP server on loopback, for tests of clients that use the `openai`
package: POST /v1/chat/completions answers with `reply(user_prompt)`, GET /v1/models lists the
allowed models, and an unknown model gets the 404 error body OpenAI and vLLM send. A reply that
raises `ErrorReply` plays a server error of its status; any other exception is a 500.

    with FakeOpenAI(lambda prompt: "ok") as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="x")

Clients must bypass any proxy for 127.0.0.1 (set NO_PROXY=127.0.0.1 in the test).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ErrorReply(Exception):
    """Raised by a test's reply: the server answers with this HTTP status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FakeOpenAI:
    def __init__(self, reply: Callable[[str], str], models: Iterable[str] = ("judge",)):
        self.reply, self.models = reply, frozenset(models)
        self.requests: list[dict] = []  # request bodies, in arrival order
        self.headers: list[dict[str, str]] = []  # their headers (lower-case names), in the same order
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    def start(self) -> FakeOpenAI:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True  # a client's lingering connection must not block stop()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        # A short poll interval: stop() waits up to one interval, once per test.
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _complete(self, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            n = next(self._ids)
        model = body.get("model")
        if model not in self.models:
            return 404, {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                                   "param": None, "code": 404}}
        user = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
        try:
            content = self.reply(user[-1] if user else "")
        except ErrorReply as err:
            return err.status, {"error": {"message": str(err), "type": "APIError", "param": None, "code": err.status}}
        except Exception as err:  # noqa: BLE001 - a test's reply that raises plays a server error
            return 500, {"error": {"message": repr(err), "type": "InternalServerError", "param": None, "code": 500}}
        return 200, {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            if self.path.rstrip("/") != "/v1/models":
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "NotFoundError"}})
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in sorted(fake.models)]
            self._send(200, {"object": "list", "data": data})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "NotFoundError"}})
            self._send(*fake._complete(body, {k.lower(): v for k, v in self.headers.items()}))

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
