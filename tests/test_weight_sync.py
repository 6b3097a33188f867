"""Weight sync from the DeepSpeed learner to vLLM rollout engines: exact, versioned, and caught up
by late actors."""

import pyarrow as pa
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.engines.models import resolve_model
from actors.fleet.fleet import RolloutPool
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
    pool = RolloutPool(cfg)
    try:
        before = ray.get([w.weight_fingerprint.remote() for w in pool.workers])
        learner.train(batch_with_signal())
        sync_weights(learner, pool)
        after = ray.get([w.weight_fingerprint.remote() for w in pool.workers])
        assert after[0] == after[1] != before[0]  # the update changed them, both engines agree

        # Exactly the learner's: an engine started fresh from the learner's saved weights matches.
        learner.save_pretrained(str(tmp_path / "learner"))
        fresh = RolloutPool(cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(tmp_path / "learner")}), "rollout": cfg.rollout.model_copy(update={"num_actors": 1})}))
        assert ray.get(fresh.workers[0].weight_fingerprint.remote()) == after[0]
        fresh.shutdown()

        # Greedy generations agree with the learner's weights run by transformers.
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "learner", dtype=torch.float32).eval()
        prompt = [1, 5, 9, 12, 30, 31]
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
        got = ray.get(pool.workers[0].greedy.remote(prompt, 12))
        assert got == expected[: len(got)] and len(got) > 0

        # Versions: engines stamp the learner's version; a late actor catches up before rolling out.
        assert [i["policy_version"] for i in ray.get([w.info.remote() for w in pool.workers])] == [learner.version] * 2
        late = RolloutPool(cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"num_actors": 1})}))
        assert ray.get(late.workers[0].pull_latest_policy.remote()) == learner.version
        assert ray.get(late.workers[0].weight_fingerprint.remote()) == after[0]
        conversations = split(load_dataset(cfg.data), cfg.data)["train"]
        batch = late.rollouts(conversations, 1, step=0)
        assert batch.policy_versions == {learner.version}  # every group, kept or degenerate
        assert all(set(ray.get(g.table)["policy_version"].to_pylist()) == {learner.version} for g in batch.groups)
        late.shutdown()
    finally:
        pool.shutdown()
        learner.shutdown()
