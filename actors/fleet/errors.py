"""The errors a rollout or learner call ends with, and the one line a Ray error is worth."""

from __future__ import annotations

import re


class RolloutError(RuntimeError):
    """A task that cannot be completed: it failed in the worker's code, or lost too many workers."""


class WorkerStartError(RolloutError, ValueError):
    """No rollout worker starts: a ValueError too, so the CLI ends with its one line, as with bad input."""


def one_line(err: BaseException) -> str:
    """The innermost `SomeError: message` line of a Ray error (they carry whole remote tracebacks)."""
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Exit): ", ln)]
    if lines:
        return lines[-1]
    return text.splitlines()[0] if text else type(err).__name__
