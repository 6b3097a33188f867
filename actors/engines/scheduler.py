"""One continuous batch per engine: every generation of every task a worker holds.

A task's lanes are *programs*, generators that yield a `Request` and get its `Generation` back
(actors.agent.episode). The scheduler's loop adds a program's next request to the engine as soon as
its last one has finished, so no lane waits for another (a lane whose extractor reply is done goes
straight on to its manager call), and steps the engine while any request is in flight. Tasks call
`run(programs)` from their own threads (the rollout worker is a threaded actor) and block until
their programs end. Whatever else touches the engine (a weight update, a fingerprint) takes
`exclusive()`, which the loop grants between two engine steps.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from actors.engines.base import Engine, Generation, Request

Program = Generator[Request, Generation, None]


@dataclass(eq=False)
class _Job:
    """The programs of one `run` call: done when all have ended, or when one has failed."""

    left: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass
class BatchStats:
    """Sequences in flight at each engine step: how full the engine's batch was."""

    steps: int = 0
    seq_steps: int = 0  # sum over steps of the requests in flight
    requests: int = 0
    generated_tokens: int = 0

    @property
    def in_flight_mean(self) -> float:
        return self.seq_steps / self.steps if self.steps else 0.0


class Scheduler:
    def __init__(self, engine: Engine, threads: int | None = None) -> None:
        self.engine = engine
        self.threads = threads  # torch threads of the loop (a thread's own OpenMP setting)
        self.stats = BatchStats()
        self.recorded: list[Request] | None = None  # every request sent, while a benchmark records
        self._engine_lock = threading.Lock()  # held by the loop for each step, and by exclusive()
        self._cv = threading.Condition()  # guards the fields below
        self._new: list[tuple[_Job, list[Program]]] = []
        self._waiting = 0  # exclusive() callers waiting for the loop to pause
        self._live: dict[str, tuple[_Job, Program]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def run(self, programs: Iterable[Program]) -> None:
        """Run the programs to their end; re-raises the first error any of them raised."""
        programs = list(programs)
        if not programs:
            return
        job = _Job(len(programs))
        with self._cv:
            self._new.append((job, programs))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error

    @contextmanager
    def exclusive(self) -> Iterator[Engine]:
        """The engine alone, between two steps (requests in flight stay queued in it)."""
        with self._cv:
            self._waiting += 1
        try:
            with self._engine_lock:
                yield self.engine
        finally:
            with self._cv:
                self._waiting -= 1
                self._cv.notify_all()

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while self._waiting or not (self._new or self._live):
                    self._cv.wait()
                new, self._new = self._new, []
            with self._engine_lock:
                for job, programs in new:
                    for program in programs:
                        self._advance(job, program, None)
                if self._live:
                    self._step()

    def _step(self) -> None:
        self.stats.steps += 1
        self.stats.seq_steps += len(self._live)
        try:
            finished = self.engine.step()
        except BaseException as err:  # noqa: BLE001 - the engine broke: every job in it fails with it
            for job in {job for job, _ in self._live.values()}:
                self._fail(job, err)
            return
        for rid, gen in finished:
            job, program = self._live.pop(rid)
            self.stats.generated_tokens += len(gen.token_ids)
            self._advance(job, program, gen)

    def _advance(self, job: _Job, program: Program, gen: Generation | None) -> None:
        """Send a finished generation into its program (None starts it) and queue its next request."""
        if job.error is not None:
            program.close()
            return
        try:
            request = program.send(gen)
            rid = str(next(self._ids))
            self.engine.add_request(rid, request)
        except StopIteration:
            job.left -= 1
            if job.left == 0:
                job.done.set()
            return
        except BaseException as err:  # noqa: BLE001 - handed to the task's thread, which re-raises it
            self._fail(job, err)
            return
        self.stats.requests += 1
        self._live[rid] = (job, program)
        if self.recorded is not None:
            self.recorded.append(request)

    def _fail(self, job: _Job, err: BaseException) -> None:
        job.error = err
        mine = [rid for rid, (j, _) in self._live.items() if j is job]
        for rid in mine:
            self._live.pop(rid)[1].close()
        if mine:
            try:
                self.engine.abort(mine)
            except Exception:  # noqa: BLE001 - a broken engine has nothing left to abort
                pass
        job.done.set()
