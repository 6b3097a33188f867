"""Weight sync from the DeepSpeed learner to vLLM rollout engines: exact, versioned, and caught up
by a worker that replaces a dead one."""

import os
import signal

import pyarrow as pa
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.engines.models import resolve_model
from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
from actors.rollout_job import smoke_config
from common.data import load_dataset, split
from common.types import StepSample, samples_to_table
from learner.deepspeed_learner import Learner
from learner.weight_sync import sync_weights

pytestmark = pytest.mark.slow


def batch_with_signal() -> list[pa.Table]:
    """Two rollouts of one group with different rewards: a non-zero update."""
    rows = [StepSample("extractor", [1, 5, 9, 12], [40 + i, 41, 42], [-3.0, -3.0, -3.0], "c", 1, "c/s1", "global", i, float(i)) for i in range(2)]
    return [samples_to_table(rows)]


def test_after_a_sync_every_engine_holds_the_learners_weights_exactly(ray_local, tmp_path):
    cfg = smoke_config(None, ["model.dtype=float32", "rollout.max_new_tokens=16", "learner.cpus_per_rank=0.5",
                              "rollout.cpus_per_actor=0.5", "learner.lr=1e-2", "learner.mini_batch=2", "learner.micro_batch=2",
                              "learner.frozen_layers=0", "learner.bf16=off"])
    model_dir = resolve_model("tiny")
    learner = Learner(str(model_dir), cfg.algo, cfg.learner, cfg.seed)
    fleet = RolloutFleet(cfg)
    fingerprints = lambda: ray.get([s.handle.weight_fingerprint.remote() for s in fleet.live()])  # noqa: E731
    try:
        before = fingerprints()
        learner.train(batch_with_signal())
        sync_weights(learner, fleet)
        after = fingerprints()
        assert after[0] == after[1] != before[0]  # the update changed them, both engines agree

        # Exactly the learner's: an engine started fresh from the learner's saved weights matches.
        learner.save_pretrained(str(tmp_path / "learner"))
        fresh = RolloutFleet(cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(tmp_path / "learner")}), "rollout": cfg.rollout.model_copy(update={"num_actors": 1})}))
        assert ray.get(fresh.live()[0].handle.weight_fingerprint.remote()) == after[0]
        fresh.shutdown()

        # Greedy generations agree with the learner's weights run by transformers.
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "learner", dtype=torch.float32).eval()
        prompt = [1, 5, 9, 12, 30, 31]
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        got = ray.get(fleet.live()[0].handle.greedy.remote(prompt, 12))
        assert got == expected[: len(got)] and len(got) > 0

        # Versions: engines stamp the learner's version. A worker killed between steps is replaced
        # at the next step, and the replacement pulls the current policy before its first task.
        assert [i["policy_version"] for i in ray.get([s.handle.info.remote() for s in fleet.live()])] == [learner.version] * 2
        assert ray.get(fleet.policy_store.copies_made.remote()) == 0  # a collective sync copies nothing
        conversations = split(load_dataset(cfg.data), cfg.data)["train"]
        fleet.run(plan_step(cfg, conversations, 1, step=0))  # every task asks the store first
        assert ray.get(fleet.policy_store.copies_made.remote()) == 0  # nor do workers that hold the version
        version, _ = ray.get(learner.weight_sources()[0].versioned_state_dict.remote())
        assert version == learner.version  # a copy says which policy it is
        victim = fleet.live()[0].info["pid"]
        os.kill(victim, signal.SIGKILL)
        batch = fleet.run(plan_step(cfg, conversations, 1, step=1))  # the step completes on the survivor
        assert fleet.take_faults()["worker_failures"] == 1
        fleet.await_target()
        assert len(fleet.live()) == 2 and victim not in {s.info["pid"] for s in fleet.live()}
        assert [i["policy_version"] for i in ray.get([s.handle.info.remote() for s in fleet.live()])] == [learner.version] * 2
        assert fingerprints() == [after[0]] * 2
        assert ray.get(fleet.policy_store.copies_made.remote()) == 1  # made when the replacement asked
        assert batch.policy_versions == {learner.version}  # every group, kept or degenerate
        batch = fleet.run(plan_step(cfg, conversations, 1, step=2))
        assert batch.policy_versions == {learner.version}
        assert all(set(g.table["policy_version"].to_pylist()) == {learner.version} for g in batch.groups)
    finally:
        fleet.shutdown()
        learner.shutdown()
