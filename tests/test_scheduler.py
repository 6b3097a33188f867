"""Exact tests of the continuous-batching scheduler on a clock-work engine (the real vLLM engine
runs through it in test_engines.py and every fleet test)."""

import hashlib
import threading

import pytest

from actors.engines.base import Generation, Request, SamplingSpec
from actors.engines.scheduler import Scheduler


class ClockEngine:
    """A request of prompt [k] finishes k steps after it was added; each step is logged.

    With `gpu=True` a step outlasts the lanes' CPU work, as on a GPU: a lane digests a reply (the
    test programs call `digest`) only once the engine has begun its next step, and that step ends
    only when every lane has digested its reply. Batches are then deterministic, and they can only
    form if lane work runs while the engine steps (a scheduler that did it between steps would
    time out here)."""

    def __init__(self, gpu: bool = False) -> None:
        self.live: dict[str, list] = {}  # request id -> [steps left, prompt]
        self.log: list[list[str]] = []  # request ids in flight at each step
        self.aborted: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.pause_s = 0.0
        self.gpu = gpu
        self.cv = threading.Condition()
        self.started = self.ended = 0  # steps begun / finished
        self.owed = 0  # replies of the last step that their lanes have not digested yet
        self.idle = False  # the last step left nothing in flight: no next step will come by itself
        self.digests: list[bool] = []  # per digest: did it run while a step was in progress?
        self.step_thread = self.lane_thread = None

    def add_request(self, request_id: str, request: Request) -> None:
        self.live[request_id] = [request.prompt[0], request.prompt]

    def step(self):
        self.gate.wait()
        self.step_thread = threading.get_ident()
        with self.cv:
            self.started += 1
            self.cv.notify_all()
            assert self.cv.wait_for(lambda: self.owed == 0, timeout=10), "lanes never digested their replies"
        threading.Event().wait(self.pause_s)
        self.log.append(sorted(self.live))
        done = []
        for rid in list(self.live):
            self.live[rid][0] -= 1
            if self.live[rid][0] == 0:
                prompt = self.live.pop(rid)[1]
                done.append((rid, Generation([prompt[0]], [0.0], f"took {prompt[0]}", "stop")))
        with self.cv:
            self.ended, self.idle = self.started, not self.live
            self.owed += len(done) if self.gpu else 0
        return done

    def digest(self) -> None:
        """A lane's CPU work on its reply: in gpu mode, during the engine's next step."""
        if not self.gpu:
            return
        self.lane_thread = threading.get_ident()
        with self.cv:
            reply_step = self.ended
            assert self.cv.wait_for(lambda: self.started > reply_step or self.idle, timeout=10), "no step overlapped"
            self.digests.append(self.started > self.ended)
            self.owed -= 1
            self.cv.notify_all()

    def abort(self, request_ids) -> None:
        self.aborted += request_ids
        for rid in request_ids:
            self.live.pop(rid, None)


def lane(lengths, replies, engine=None):
    """A program asking for one generation per length, in order, recording the replies."""
    for k in lengths:
        gen = yield Request([k], SamplingSpec(seed=k))
        replies.append(gen.text)
        if engine is not None:
            engine.digest()


def test_a_lane_goes_on_as_soon_as_its_reply_is_done_without_waiting_for_the_others():
    engine = ClockEngine(gpu=True)
    fast, slow = [], []
    Scheduler(engine).run([lane([1, 1, 1], fast, engine), lane([3], slow, engine)])
    assert fast == ["took 1"] * 3 and slow == ["took 3"]
    # The fast lane digests each reply during the next step and its next request joins the step
    # after; in lockstep its 2nd and 3rd requests would wait for the slow one (5 steps).
    assert engine.log == [["0", "1"], ["1"], ["1", "2"], ["3"]]


def test_lanes_digest_their_replies_on_their_own_thread_while_the_engine_steps():
    engine = ClockEngine(gpu=True)
    Scheduler(engine).run([lane([1, 1, 1], [], engine), lane([4], [], engine)])
    # Replies of steps 1 and 3 are digested during steps 2 and 4; the last two found the engine
    # with nothing in flight (it waited for them: it had nothing to overlap).
    assert engine.digests == [True, True, False, False]
    assert len({engine.step_thread, engine.lane_thread, threading.get_ident()}) == 3


def test_tasks_on_their_own_threads_share_one_batch_and_each_gets_its_own_replies():
    engine = ClockEngine(gpu=True)
    engine.pause_s = 0.02  # task b arrives while task a is still generating
    scheduler = Scheduler(engine)
    replies = {name: [] for name in ("a", "b")}
    a = threading.Thread(target=scheduler.run, args=([lane([5, 5], replies["a"], engine) for _ in range(2)],))
    a.start()
    while not engine.log:
        threading.Event().wait(0.001)
    scheduler.run([lane([2, 2], replies["b"], engine) for _ in range(2)])
    a.join(timeout=10)
    assert replies == {"a": ["took 5"] * 4, "b": ["took 2"] * 4}
    # b's lanes joined a's batch at the next step: some steps held all four lanes. a's second
    # requests start right after its first (10 steps), or a step later if b still had one in flight
    # (a's lanes digest during that step; which it is depends on when b arrived).
    assert max(len(ids) for ids in engine.log) == 4 and len(engine.log) in (10, 11)
    assert scheduler.stats.requests == 8 and 2 < scheduler.stats.in_flight_mean < 4


def test_a_failing_program_fails_its_own_task_only_and_its_requests_are_aborted():
    engine = ClockEngine(gpu=True)
    scheduler = Scheduler(engine)

    def broken():
        yield Request([1], SamplingSpec())
        engine.digest()
        raise ValueError("bad reply")

    errors, ok = [], []

    def task_a():
        try:
            scheduler.run([broken(), lane([5], [], engine)])
        except ValueError as err:
            errors.append(str(err))

    t = threading.Thread(target=task_a)
    t.start()
    scheduler.run([lane([1, 1, 1, 1, 1, 1], ok, engine)])
    t.join(timeout=10)
    assert errors == ["bad reply"] and ok == ["took 1"] * 6
    assert len(engine.aborted) == 1  # the failed task's other lane, still in flight


def test_exclusive_use_of_the_engine_waits_for_a_point_between_steps():
    engine = ClockEngine()
    scheduler = Scheduler(engine)
    seen = []
    engine.gate.clear()
    t = threading.Thread(target=scheduler.run, args=([lane([3], [])],))
    t.start()
    while not engine.live:
        threading.Event().wait(0.01)
    engine.gate.set()
    with scheduler.exclusive() as held:
        seen.append(len(engine.log))
        threading.Event().wait(0.05)
        seen.append(len(engine.log))  # no step ran while we held it
        assert held is engine
    t.join(timeout=10)
    assert seen[0] == seen[1] and len(engine.log) == 3


def test_an_engine_that_breaks_fails_every_task_in_it():
    class Broken(ClockEngine):
        def step(self):
            raise RuntimeError("CPU Generator does not use offset")

    with pytest.raises(RuntimeError, match="offset"):
        Scheduler(Broken()).run([lane([1], [])])


class HashEngine:
    """Replies that depend only on the request (prompt and seed), as a seeded sampler's do, after
    1-4 steps that depend on it too: which requests share a step varies, the replies must not."""

    def __init__(self) -> None:
        self.live: dict[str, list] = {}
        self.batches: list[int] = []
        self.compositions: list[list[tuple]] = []  # the requests (prompt, seed) in each step

    @staticmethod
    def reply(request: Request) -> Generation:
        digest = hashlib.blake2b(repr((request.prompt, request.spec.seed)).encode(), digest_size=8).digest()
        ids = list(digest[: 1 + digest[0] % 6])
        return Generation(ids, [-float(i) for i in ids], str(ids), "stop")

    def add_request(self, request_id: str, request: Request) -> None:
        self.live[request_id] = [1 + self.reply(request).token_ids[0] % 4, request]

    def step(self):
        self.batches.append(len(self.live))
        self.compositions.append(sorted((tuple(r.prompt), r.spec.seed) for _, r in self.live.values()))
        done = []
        for rid in list(self.live):
            self.live[rid][0] -= 1
            if self.live[rid][0] == 0:
                done.append((rid, self.reply(self.live.pop(rid)[1])))
        return done

    def abort(self, request_ids) -> None:
        for rid in request_ids:
            self.live.pop(rid, None)


def chat(task: int, lane_index: int, transcript: list, work_s: float = 0.0):
    """A lane whose every prompt extends the last one with its reply (as a conversation does)."""
    prompt = [task, lane_index]
    for turn in range(4):
        gen = yield Request(prompt, SamplingSpec(seed=1000 * task + 10 * lane_index + turn))
        transcript.append(gen.token_ids)
        threading.Event().wait(work_s * (lane_index % 3))  # uneven CPU work: batches reshuffle
        prompt = prompt + gen.token_ids


def one_by_one(program) -> None:
    """Run a program with each request answered alone, straight from the engine."""
    try:
        request = next(program)
        while True:
            request = program.send(HashEngine.reply(request))
    except StopIteration:
        pass


def test_overlapped_batches_give_each_request_the_reply_it_gets_alone():
    engine = HashEngine()
    scheduler = Scheduler(engine)
    got = {(t, i): [] for t in range(3) for i in range(6)}
    tasks = [threading.Thread(target=scheduler.run, args=([chat(t, i, got[t, i], 0.002) for i in range(6)],))
             for t in range(3)]
    for task in tasks:
        task.start()
    for task in tasks:
        task.join(timeout=30)
    alone = {key: [] for key in got}
    for t, i in alone:
        one_by_one(chat(t, i, alone[t, i]))
    assert got == alone and all(len(replies) == 4 for replies in got.values())
    assert max(engine.batches) > 1 and scheduler.stats.requests == 72


def test_lockstep_batches_are_the_same_however_long_the_lanes_cpu_work_takes():
    """rollout.deterministic: a step waits for every lane to take its reply, so which requests
    share a step (what a sequence's logprobs depend on in vLLM) is a function of the programs."""
    def batches(work_s: float, lockstep: bool) -> list[list[tuple]]:
        engine = HashEngine()
        Scheduler(engine, lockstep=lockstep).run([chat(0, i, [], work_s) for i in range(6)])
        return engine.compositions

    steady = batches(0.0, lockstep=True)
    assert batches(0.004, lockstep=True) == steady and max(len(b) for b in steady) == 6
    # Overlapped, the engine steps on while the slow lanes work: other batches, same replies.
    assert batches(0.004, lockstep=False) != steady
