"""The collective weight sync (learner.weight_sync=collective) beside the object-store one: learner
rank 0 and every engine in one group (gloo here) through vLLM's weight-transfer API, exact after
every sync, and re-formed when the fleet has changed. Real vLLM, DeepSpeed and Ray."""

import os
import signal

import pyarrow as pa
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.engines.models import resolve_model
from actors.fleet.fleet import RolloutFleet
from actors.fleet.scaling import ScalingPolicy
from actors.rollout_job import smoke_config
from learner.deepspeed_learner import Learner
from common.types import StepSample, samples_to_table
from learner.weight_sync import sync_weights

pytestmark = pytest.mark.slow

PROMPT = [1, 5, 9, 12, 30, 31]
# A 1 MB bucket: the tiny model's ~20 MB of fp32 weights cross in many packed buckets.
OVERRIDES = ["model.dtype=float32", "rollout.max_new_tokens=16", "learner.cpus_per_rank=0.5", "rollout.cpus_per_actor=0.5",
             "learner.lr=1e-2", "learner.mini_batch=2", "learner.micro_batch=2", "learner.frozen_layers=0", "learner.bf16=off",
             "learner.weight_sync=collective", "learner.weight_bucket_mb=1"]


def batch_with_signal() -> list[pa.Table]:
    """Two rollouts of one group with different rewards: a non-zero update."""
    rows = [StepSample("extractor", [1, 5, 9, 12], [40 + i, 41, 42], [-3.0, -3.0, -3.0], "c", 1, "c/s1", "global", i, float(i))
            for i in range(2)]
    return [samples_to_table(rows)]


@pytest.fixture(scope="module")
def setup(ray_local):
    cfg = smoke_config(None, OVERRIDES)
    learner = Learner(str(resolve_model("tiny")), cfg.algo, cfg.learner, cfg.seed)
    fleet = RolloutFleet(cfg)
    try:
        yield cfg, learner, fleet
    finally:
        fleet.shutdown()
        learner.shutdown()


def fingerprints(fleet: RolloutFleet) -> list[str]:
    return ray.get([s.handle.weight_fingerprint.remote() for s in fleet.live()])


def greedy_agrees(fleet: RolloutFleet, model_dir) -> bool:
    """Every engine's greedy reply is transformers' on the learner's saved weights (up to where the
    engine stopped: it stops at the chat's end token, transformers only at its eos)."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False)[0, len(PROMPT):].tolist()
    replies = ray.get([s.handle.greedy.remote(PROMPT, 12) for s in fleet.live()])
    return all(got and got == expected[: len(got)] for got in replies)


def learners_fingerprint(cfg, model_dir) -> str:
    """The learner's weights as an engine started fresh from its saved checkpoint holds them."""
    fresh_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(model_dir)}),
                                       "rollout": cfg.rollout.model_copy(update={"num_actors": 1})})
    fresh = RolloutFleet(fresh_cfg)
    try:
        return ray.get(fresh.live()[0].handle.weight_fingerprint.remote())
    finally:
        fresh.shutdown()


def use(learner: Learner, mode: str) -> None:
    learner.cfg = learner.cfg.model_copy(update={"weight_sync": mode})


def versions(fleet: RolloutFleet) -> list[int]:
    return [i["policy_version"] for i in ray.get([s.handle.info.remote() for s in fleet.live()])]


def test_zero3_ranks_gather_together_and_rank_0_sends(ray_local, tmp_path):
    """Before the module's fleet starts (the cluster has 2 CPUs): two ZeRO-3 ranks, one engine."""
    cfg = smoke_config(None, OVERRIDES + ["learner.zero_stage=3", "learner.num_ranks=2", "learner.mini_batch=4",
                                          "rollout.num_actors=1"])
    learner = Learner(str(resolve_model("tiny")), cfg.algo, cfg.learner, cfg.seed)
    fleet = RolloutFleet(cfg)
    try:
        learner.train(batch_with_signal())
        sync_weights(learner, fleet)
        assert learner.transfer_group.collective
        synced = fingerprints(fleet)
        learner.save_pretrained(str(tmp_path / "zero3"))
        assert greedy_agrees(fleet, tmp_path / "zero3")
        use(learner, "object_store")  # the full state dict, gathered by the path the object store uses
        sync_weights(learner, fleet)
        assert fingerprints(fleet) == synced
    finally:
        fleet.shutdown()
        learner.shutdown()


def test_both_modes_give_every_engine_exactly_the_learners_weights(setup, tmp_path):
    cfg, learner, fleet = setup
    before = fingerprints(fleet)

    learner.train(batch_with_signal())
    use(learner, "collective")
    sync_weights(learner, fleet)
    group = learner.transfer_group
    assert group.collective and group.members == tuple(s.worker_id for s in fleet.live()) and len(group.members) == 2
    learner.save_pretrained(str(tmp_path / "v1"))
    after = fingerprints(fleet)
    assert after == [learners_fingerprint(cfg, tmp_path / "v1")] * 2 and after[0] != before[0]
    assert greedy_agrees(fleet, tmp_path / "v1")
    assert versions(fleet) == [learner.version] * 2

    learner.train(batch_with_signal())
    use(learner, "object_store")
    sync_weights(learner, fleet)
    learner.save_pretrained(str(tmp_path / "v2"))
    via_store = fingerprints(fleet)
    assert via_store == [learners_fingerprint(cfg, tmp_path / "v2")] * 2 and via_store[0] != after[0]
    assert greedy_agrees(fleet, tmp_path / "v2")
    assert versions(fleet) == [learner.version] * 2

    # The same version again through the group (kept: same members): the same weights, bit for bit.
    use(learner, "collective")
    sync_weights(learner, fleet)
    assert learner.transfer_group is group
    assert fingerprints(fleet) == via_store


def test_a_worker_that_joins_catches_up_and_the_next_sync_regroups_with_it(setup, tmp_path):
    cfg, learner, fleet = setup
    use(learner, "collective")
    learner.train(batch_with_signal())
    sync_weights(learner, fleet)
    old = learner.transfer_group
    current = fingerprints(fleet)

    fleet.policy = ScalingPolicy(lo=3, hi=3, initial=3, lanes_per_worker=1, delay_s=0)  # grow by one
    fleet.idle(0.1)
    fleet.await_target()
    joined = next(s for s in fleet.live() if s.worker_id not in old.members)
    # It started between syncs: it pulled the current version from the policy store.
    assert joined.info["policy_version"] == learner.version
    assert ray.get(joined.handle.weight_fingerprint.remote()) == current[0]

    learner.train(batch_with_signal())
    sync_weights(learner, fleet)
    group = learner.transfer_group
    assert group is not old and group.collective and len(group.members) == 3 and joined.worker_id in group.members
    synced = fingerprints(fleet)
    assert len(set(synced)) == 1 and synced[0] != current[0]
    assert versions(fleet) == [learner.version] * 3
    learner.save_pretrained(str(tmp_path / "grown"))
    assert greedy_agrees(fleet, tmp_path / "grown")
    # The object store's push of the same version agrees with the group's, bit for bit.
    use(learner, "object_store")
    sync_weights(learner, fleet)
    assert fingerprints(fleet) == synced


def test_a_member_killed_between_syncs_is_dropped_and_its_replacement_joins_the_next_group(setup):
    cfg, learner, fleet = setup
    use(learner, "collective")
    sync_weights(learner, fleet)
    fleet.take_faults()
    victim = fleet.live()[0]
    os.kill(victim.info["pid"], signal.SIGKILL)  # the fleet has not noticed: no task ran since

    # The next sync finds it dead, drops it, and regroups with the others.
    learner.train(batch_with_signal())
    sync_weights(learner, fleet)
    assert fleet.take_faults()["worker_failures"] == 1
    group = learner.transfer_group
    assert group.collective and group.members == tuple(s.worker_id for s in fleet.live()) and len(group.members) == 2
    assert victim.worker_id not in group.members and versions(fleet) == [learner.version] * 2
    assert len(set(fingerprints(fleet))) == 1

    fleet.await_target()  # its replacement starts from the policy store
    assert versions(fleet) == [learner.version] * 3
    learner.train(batch_with_signal())
    sync_weights(learner, fleet)
    group = learner.transfer_group
    assert group.collective and len(group.members) == 3 and victim.worker_id not in group.members
    assert len(set(fingerprints(fleet))) == 1 and versions(fleet) == [learner.version] * 3
