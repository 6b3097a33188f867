"""OpenAI-compatible endpoints (the answer agent's, the judge's): the outage rule.

An endpoint that fails is never scored as a wrong answer: a transient error (refused, timeout,
408/409/429, 5xx) is retried with capped exponential backoff while the work waits, up to an outage
timeout from the request's first failure; past it, or at once for a request refused for good (400,
401, 404), `EndpointDown` (a ValueError, one line: url, model, last error) stops the run. Retries
are counted per caller (`RequestCounts`). `check_endpoint` is the start probe.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, CancelledError, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T, A = TypeVar("T"), TypeVar("A")


class EndpointDown(ValueError):
    """An OpenAI-compatible endpoint refused a request for good, or stayed down past its outage
    timeout: one line naming what it serves (reward.answer_agent, eval.judge), the model, the url
    and the last error. A ValueError, so `memr2` ends with that line (memr2.cli); the rollout fleet
    re-raises it on the driver as it is and never re-runs the task elsewhere (actors.fleet.fleet)."""


@dataclass(slots=True)
class RequestCounts:
    """What an endpoint's errors cost one caller (a rollout task, an eval)."""

    retries: int = 0  # requests re-sent after an error
    failures: int = 0  # requests that met at least one error (then answered, or the call raised)

    def add(self, other: RequestCounts) -> None:
        self.retries += other.retries
        self.failures += other.failures


def describe(err: BaseException) -> str:
    """One line for an endpoint error: its HTTP status and message, or the connection's own error."""
    import openai

    if isinstance(err, openai.APIStatusError):
        text = f"HTTP {err.status_code}: " + re.sub(r"^Error code: \d+ - ", "", err.message)
    elif isinstance(err, openai.APITimeoutError):
        text = "request timed out"
    elif isinstance(err, openai.APIConnectionError) and err.__cause__ is not None:
        text = f"{type(err.__cause__).__name__}: {err.__cause__}"
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:300]


def _transient(err: Exception) -> bool:
    import openai

    status = err.status_code if isinstance(err, openai.APIStatusError) else None
    return isinstance(err, openai.APIConnectionError) or status in (408, 409, 429) or (status or 0) >= 500  # + timeouts


def send_until_up(send: Callable[[], T], where: str, outage_timeout_s: float, backoff_s: float = 0.5,
                  max_backoff_s: float = 15.0, stop: threading.Event | None = None, hint_400: str = "") -> tuple[T, int]:
    """`send()` under the outage rule; returns (its value, how many times it was re-sent).

    A transient error (refused connection, timeout, 408/409/429, 5xx) is retried with exponential
    backoff (`backoff_s` doubling, each sleep at most `max_backoff_s`) until a request succeeds or
    `outage_timeout_s` has passed since its first failure: then EndpointDown, with the last error.
    Any other API error (400, 401, 404, ...) raises EndpointDown at once: a config error, which no
    retry mends. `where` starts the message ("reward.answer_agent 'm' at http://h/v1"); a 400 adds
    `hint_400`. `stop` set (a sibling request failed for good) ends the retries (CancelledError)."""
    import openai

    first, retries, stop = None, 0, stop or threading.Event()
    while True:
        if stop.is_set():
            raise CancelledError
        try:
            return send(), retries
        except openai.APIError as err:
            if not _transient(err):
                hint = hint_400 if isinstance(err, openai.APIStatusError) and err.status_code == 400 else ""
                raise EndpointDown(f"{where}: request refused ({describe(err)}){hint}") from None
            now = time.monotonic()
            if first is None:
                first = now
                log.warning("%s: %s; retrying for up to %g s", where, describe(err), outage_timeout_s)
            if now - first >= outage_timeout_s:
                raise EndpointDown(f"{where}: no answer for {now - first:.1f} s (outage_timeout_s {outage_timeout_s:g}); "
                                   f"last error: {describe(err)}") from None
            if stop.wait(min(backoff_s * 2 ** min(retries, 20), max_backoff_s, first + outage_timeout_s - now)):
                raise CancelledError from None
            retries += 1


def run_all(fn: Callable[[A, threading.Event], T], items: Sequence[A], concurrency: int) -> list[T]:
    """`fn(item, stop)` for every item on up to `concurrency` threads; the results in order. The
    first error is raised at once: `stop` is set (siblings give up at their next retry) and items
    not yet started are dropped, so one endpoint down never waits out every request's timeout."""
    stop = threading.Event()

    def guarded(item: A) -> T:
        # The failing thread sets `stop` itself: it would otherwise start the next queued item
        # (and send its request) before this thread wakes up to cancel it.
        if stop.is_set():
            raise CancelledError
        try:
            return fn(item, stop)
        except BaseException:
            stop.set()
            raise

    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(items))))
    try:
        futures = [pool.submit(guarded, item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f.exception() for f in futures if f in done and f.exception() is not None]
        if failed:
            raise next((e for e in failed if not isinstance(e, CancelledError)), failed[0])
        return [f.result() for f in futures]
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


def check_endpoint(url: str, model: str, what: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 5.0,
                   tries: int = 3, pause_s: float = 1.0) -> list[str]:
    """A start probe: GET {url}/models (a few quick tries); the served model ids. Raises
    EndpointDown (a ValueError) in one line if the url does not answer ("eval.judge.url http://..:
    no answer (ConnectError: ...)"), refuses the listing, or does not serve `model`."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=os.environ.get(api_key_env) or "EMPTY", timeout=timeout_s, max_retries=0)
    try:
        for attempt in range(tries):
            try:
                served = [m.id for m in client.models.list().data]
                break
            except openai.APIError as err:
                if attempt + 1 < tries and _transient(err):
                    time.sleep(pause_s)
                    continue
                why = f"no answer ({describe(err)})" if isinstance(err, openai.APIConnectionError) else f"GET /models: {describe(err)}"
                raise EndpointDown(f"{what}.url {url}: {why}") from None
    finally:
        client.close()
    if model not in served:
        raise EndpointDown(f"{what}.url {url} serves {sorted(served)}, not {model!r} ({what}.model)")
    return served
