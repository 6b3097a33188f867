"""Exact tests of the continuous-batching scheduler on a clock-work engine (the real vLLM engine
runs through it in test_engines.py and every fleet test)."""

import threading

import pytest

from actors.engines.base import Generation, Request, SamplingSpec
from actors.engines.scheduler import Scheduler


class ClockEngine:
    """A request of prompt [k] finishes k steps after it was added; each step is logged."""

    def __init__(self) -> None:
        self.live: dict[str, list] = {}  # request id -> [steps left, prompt]
        self.log: list[list[str]] = []  # request ids in flight at each step
        self.aborted: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.pause_s = 0.0

    def add_request(self, request_id: str, request: Request) -> None:
        self.live[request_id] = [request.prompt[0], request.prompt]

    def step(self):
        self.gate.wait()
        threading.Event().wait(self.pause_s)
        self.log.append(sorted(self.live))
        done = []
        for rid in list(self.live):
            self.live[rid][0] -= 1
            if self.live[rid][0] == 0:
                prompt = self.live.pop(rid)[1]
                done.append((rid, Generation([prompt[0]], [0.0], f"took {prompt[0]}", "stop")))
        return done

    def abort(self, request_ids) -> None:
        self.aborted += request_ids
        for rid in request_ids:
            self.live.pop(rid, None)


def lane(lengths, replies):
    """A program asking for one generation per length, in order, recording the replies."""
    for k in lengths:
        gen = yield Request([k], SamplingSpec(seed=k))
        replies.append(gen.text)


def test_a_lane_goes_on_as_soon_as_its_reply_is_done_without_waiting_for_the_others():
    engine = ClockEngine()
    fast, slow = [], []
    Scheduler(engine).run([lane([1, 1, 1], fast), lane([3], slow)])
    assert fast == ["took 1"] * 3 and slow == ["took 3"]
    # In lockstep the fast lane's 2nd and 3rd requests would wait for the slow one: 5 steps.
    assert len(engine.log) == 3 and all(len(ids) == 2 for ids in engine.log)


def test_tasks_on_their_own_threads_share_one_batch_and_each_gets_its_own_replies():
    engine = ClockEngine()
    engine.pause_s = 0.01  # task b arrives while task a is still generating
    scheduler = Scheduler(engine)
    replies = {name: [] for name in ("a", "b")}
    a = threading.Thread(target=scheduler.run, args=([lane([5, 5], replies["a"]) for _ in range(2)],))
    a.start()
    while not engine.log:
        threading.Event().wait(0.001)
    scheduler.run([lane([2, 2], replies["b"]) for _ in range(2)])
    a.join(timeout=10)
    assert replies == {"a": ["took 5"] * 4, "b": ["took 2"] * 4}
    # b's lanes joined a's batch at the next step: some steps held all four lanes.
    assert max(len(ids) for ids in engine.log) == 4 and len(engine.log) == 10
    assert scheduler.stats.requests == 8 and 2 < scheduler.stats.in_flight_mean < 4


def test_a_failing_program_fails_its_own_task_only_and_its_requests_are_aborted():
    engine = ClockEngine()
    scheduler = Scheduler(engine)

    def broken():
        yield Request([1], SamplingSpec())
        raise ValueError("bad reply")

    errors, ok = [], []

    def task_a():
        try:
            scheduler.run([broken(), lane([5], [])])
        except ValueError as err:
            errors.append(str(err))

    t = threading.Thread(target=task_a)
    t.start()
    scheduler.run([lane([1, 1, 1, 1, 1, 1], ok)])
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
