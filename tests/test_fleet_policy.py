"""Exact tests of the fleet's pure parts: the scaling policy on a fake clock, the result ledger,
the task plan (stable ids, seeds independent of workers), and the config's fleet bounds."""

import pytest

from actors.fleet.errors import one_line
from actors.fleet.slots import Round, Slot, Work, lane_capacity, max_tasks, pick_slot
from actors.fleet.scaling import ScalingPolicy, autoscale_bounds
from actors.agent.groups import EvalResult, LaneStats
from actors.fleet.batch import RolloutBatch
from actors.fleet.tasks import StepPlan, plan_step, plan_validation, with_validation
from common.config import ConfigError, load_config
from common.data import load_dataset, split


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_scaling_grows_at_once_and_shrinks_only_after_the_delay():
    clock = Clock()
    policy = ScalingPolicy(lo=1, hi=4, initial=1, lanes_per_worker=2, delay_s=60, clock=clock)
    assert policy.target(0) == 1
    assert policy.target(5) == 3  # ceil(5 / 2), at once
    assert policy.target(40) == 4  # capped at max
    clock.t = 30
    assert policy.target(0) == 4  # a lull shorter than the delay (an update) keeps the fleet
    clock.t = 59
    assert policy.target(2) == 4
    clock.t = 61
    assert policy.target(2) == 1  # the burst at t=0 left the window: shrink to what is needed
    clock.t = 70
    assert policy.target(7) == 4  # and grow again at once


def test_fixed_size_when_min_equals_max():
    clock = Clock()
    policy = ScalingPolicy(lo=2, hi=2, initial=2, lanes_per_worker=1, delay_s=0, clock=clock)
    assert [policy.target(b) for b in (0, 1, 50, 0)] == [2, 2, 2, 2]


def deal(cfg, tasks, workers=2):
    """The fleet's dispatch on idle workers: how many tasks each takes before the rest must wait."""
    slots = [Slot(f"w{i}", None, 0.0, None, None) for i in range(workers)]
    queue = list(tasks)
    while queue and (slot := pick_slot(slots, queue[0], lane_capacity(cfg), max_tasks(cfg))) is not None:
        slot.running[object()] = Work(queue.pop(0), None)
    return [len(s.running) for s in slots], [s.lanes for s in slots]


def test_workers_hold_tasks_by_lanes_so_validation_fills_the_engines_like_a_step():
    cfg = load_config(None, ["algo.local_prob=1"])
    convs = split(load_dataset(cfg.data), cfg.data)["train"]
    assert lane_capacity(cfg) == 32  # 4 global tasks of n = 8
    # Global tasks: four a worker, as before lanes were counted.
    assert deal(cfg, plan_step(cfg, convs, 2, step=0).global_tasks) == ([4, 4], [32, 32])
    # One-lane validation rollouts: 20 conversations all in flight at once, not 8 in waves.
    assert deal(cfg, plan_validation(convs[:1] * 20, 2, round_=0)) == ([10, 10], [10, 10])
    # Local tasks (m = 2) pack fifteen onto one worker; a global task then waits for 8 lanes free
    # (and what queues behind it waits too: tasks go in plan order).
    plan = plan_step(cfg, convs, 2, step=0)
    assert deal(cfg, [*plan.local_tasks[:15], plan.global_tasks[0], plan.local_tasks[15]], workers=1) == ([15], [30])
    # rollout.deterministic: one task a worker, however few its lanes.
    det = load_config(None, ["rollout.deterministic=true", "rollout.tasks_per_worker=1"])
    assert deal(det, plan_validation(convs, 2, round_=0)) == ([1, 1], [1, 1])


def test_each_result_enters_once_and_a_late_duplicate_is_refused():
    rnd = Round(expected=2)
    assert rnd.accept("step0/global/c", "first") and not rnd.done()
    assert not rnd.accept("step0/global/c", "late copy from a dropped worker")
    assert rnd.results["step0/global/c"] == "first"
    assert rnd.accept("step0/local/c/s1/anchor0", "x") and rnd.done()


def test_task_ids_are_stable_and_anchors_are_drawn_before_any_rollout():
    cfg = load_config(None, ["data.synth.conversations=3", "data.synth.val_conversations=1", "algo.local_prob=0.5", "rollout.n_global=4"])
    convs = split(load_dataset(cfg.data), cfg.data)["train"]
    a, b = plan_step(cfg, convs, 2, step=3), plan_step(cfg, convs, 2, step=3)
    assert a == b  # the same step plans the same tasks, whoever runs them
    assert [t.task_id for t in a.global_tasks] == [f"step3/global/{c.sample_id}" for c in convs]
    for g in a.global_tasks:
        for anchor in g.anchors:
            local = next(t for t in a.local_tasks if t.task_id == anchor.snapshot_id)
            assert local.task_id == f"step3/local/{g.conv.sample_id}/s{anchor.session}/anchor{anchor.rollout}"
            assert (local.session, local.anchor) == (anchor.session, anchor.rollout) and 0 <= anchor.rollout < 4
    assert plan_step(cfg, convs, 2, step=4) != a
    evals = plan_validation(convs, 2, round_=1)
    assert [e.task_id for e in evals] == [f"eval1/{c.sample_id}" for c in convs]
    assert [e.seed_key for e in evals] == [e.seed_key for e in plan_validation(convs, 2, round_=7)]  # same requests every round


def test_a_validation_rides_in_a_steps_round_and_returns_apart_from_its_groups():
    cfg = load_config(None, ["data.synth.conversations=4", "data.synth.val_conversations=2", "algo.local_prob=1", "rollout.n_global=4"])
    data = split(load_dataset(cfg.data), cfg.data)
    step = plan_step(cfg, data["train"], 2, step=0)
    plan = with_validation(step, data["val"], 3)
    # Dealt in one round after the step's own tasks, the step's tasks unchanged.
    assert plan.tasks == step.tasks + plan.validation and (plan.global_tasks, plan.local_tasks) == (step.global_tasks, step.local_tasks)
    assert [e.task_id for e in plan.validation] == [f"step0/eval/{c.sample_id}" for c in data["val"]]
    # The requests of any validation round, at the horizon asked for, not the step's.
    assert [e.seed_key for e in plan.validation] == [e.seed_key for e in plan_validation(data["val"], 3, round_=5)]
    assert {e.horizon for e in plan.validation} == {3}
    # Results arrive in any order; the batch keeps them in plan order, out of its rollout numbers.
    alone = with_validation(StepPlan(0, (), ()), data["val"], 3)
    results = {t.task_id: EvalResult(score=i, stats=LaneStats(generated_tokens=50)) for i, t in reversed(list(enumerate(alone.validation)))}
    batch = RolloutBatch.assemble(alone, results)
    assert [r.score for r in batch.validation] == [0, 1] and batch.episodes == batch.stats.generated_tokens == 0


def test_fleet_bounds_default_to_a_fixed_size_and_bad_bounds_are_one_line():
    cfg = load_config(None, ["rollout.num_actors=3"])
    assert autoscale_bounds(cfg) == (3, 3)
    assert autoscale_bounds(load_config(None, ["cluster.autoscale_min_actors=1", "cluster.autoscale_max_actors=8"])) == (1, 8)
    with pytest.raises(ConfigError, match=r"rollout.num_actors \(4, the fleet's size at start\) is above cluster.autoscale_max_actors \(2\)"):
        load_config(None, ["rollout.num_actors=4", "cluster.autoscale_max_actors=2"])
    with pytest.raises(ConfigError, match=r"cluster.autoscale_min_actors \(3\) exceeds cluster.autoscale_max_actors \(2\)"):
        load_config(None, ["cluster.autoscale_min_actors=3", "cluster.autoscale_max_actors=2"])


def test_one_line_takes_the_innermost_error_of_a_remote_traceback():
    err = RuntimeError("ray::RolloutWorker.__init__() (pid=1)\n  File \"x.py\", line 3\n    raise\nValueError: model 'gpt-17' is neither ...\n")
    assert one_line(err) == "ValueError: model 'gpt-17' is neither ..."
