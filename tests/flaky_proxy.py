"""A fault-injecting HTTP/1.1 proxy on loopback, for tests of the outage rule: it sits in front of
any HTTP server (tests/fake_openai.py, vLLM's own OpenAI server) and, from its `trigger`-th
request on, plays an outage as a timeline of phases, then passes requests through again:

    "503"     every request is answered 503 Service Unavailable (a server restarting, overloaded)
    "refuse"  the listening socket is closed: new connections are refused (ECONNREFUSED), and a
              request on a connection opened before is cut without a reply
    "hang"    requests are read and never answered (a stuck server): the client's timeout fires

    with FlakyProxy(upstream_url, [("503", 2), ("refuse", 2), ("hang", 2.5)], trigger=3) as proxy:
        client = openai.OpenAI(base_url=proxy.url, ...)

Requests are parsed as far as Content-Length (what the `openai` client sends); responses are piped
back byte for byte. `proxy.requests` counts every request, `proxy.faulted` those that met a phase, `proxy.modes_seen`
the phases that did.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from urllib.parse import urlsplit

PASS = "pass"


class FlakyProxy:
    def __init__(self, upstream_url: str, phases: list[tuple[str, float]], trigger: int = 1):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.path = parts.path.rstrip("/")
        self.phases, self.trigger = list(phases), trigger
        self.requests = self.faulted = 0
        self.modes_seen: set[str] = set()  # the phases that met a request (refuse: that closed the listener)
        self.started_at: float | None = None  # when the outage began
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self.port = 0
        self.url = ""

    # -- the timeline -------------------------------------------------------------------------------
    def mode(self) -> str:
        with self._lock:
            if self.started_at is None:
                return PASS
            elapsed = time.monotonic() - self.started_at
        for name, length in self.phases:
            if elapsed < length:
                return name
            elapsed -= length
        return PASS

    def over(self) -> bool:
        """The outage began and every phase has passed."""
        return self.started_at is not None and self.mode() == PASS

    def _count(self) -> str:
        with self._lock:
            self.requests += 1
            if self.requests == self.trigger and self.started_at is None:
                self.started_at = time.monotonic()
        mode = self.mode()
        if mode != PASS:
            with self._lock:
                self.faulted += 1
                self.modes_seen.add(mode)
        return mode

    # -- the sockets --------------------------------------------------------------------------------
    def start(self) -> FlakyProxy:
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}{self.path}"
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        return sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            refusing = self.mode() == "refuse"
            if refusing and self._listener is not None:
                self._listener.close()  # nothing listens: connections are refused
                self._listener = None
                with self._lock:
                    self.modes_seen.add("refuse")
            elif not refusing and self._listener is None:
                try:
                    self._listener = self._listen(self.port)
                except OSError:  # the port is briefly someone's source port: try again
                    pass
            if self._listener is None:
                time.sleep(0.02)
                continue
            ready, _, _ = select.select([self._listener], [], [], 0.02)
            if ready:
                conn, _ = self._listener.accept()
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        if self._listener is not None:
            self._listener.close()

    def _serve(self, conn: socket.socket) -> None:
        upstream: socket.socket | None = None
        buf = b""
        try:
            while not self._stop.is_set():
                request, buf = _read_request(conn, buf)
                if request is None:
                    return
                mode = self._count()
                if mode == "503":
                    body = b'{"error": {"message": "Service Unavailable (flaky proxy)", "code": 503}}'
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                    return
                if mode == "refuse":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return  # closed with a reset, no reply
                if mode == "hang":
                    while self.mode() == "hang" and not self._stop.is_set():
                        time.sleep(0.05)
                    return  # the client gave up long ago
                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    threading.Thread(target=_pipe, args=(upstream, conn), daemon=True).start()
                upstream.sendall(request)
        except OSError:
            return
        finally:
            for sock in (upstream, conn):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass


def _read_request(conn: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
    """One request's bytes (head and Content-Length body) and what was read past it; None at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        rest += chunk
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
