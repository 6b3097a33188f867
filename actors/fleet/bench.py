"""`memr2 bench rollout`: a rollout worker's throughput against vLLM's own limit, side by side.

One worker (one engine, one CPU) runs a step's rollout work: a global task per conversation, n
lanes each, and the local tasks from their anchors, all dealt to it at once so its scheduler keeps
them in one continuous batch. Every request it sends is recorded. Then the same requests, with the
same sampling parameters and seeds, go through vLLM's `LLM.generate` on the same engine, in
batches as large as the worker's mean batch: the raw limit at that concurrency, with none of the
episode's work (parsing, retrieval, memory operations, scoring) in between. ratio = worker / raw.
"""

from __future__ import annotations

import time

import ray

from actors.engines.models import check_model_name
from actors.fleet.cluster import fleet_asks, init_ray
from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
from common.config import Config, load_config
from common.data import load_dataset, split

# SmolLM2 zero-shot on six conversations of n = 8: 48 lanes and their local branches in flight.
BENCH = [
    "model.name=smollm2", "rollout.num_actors=1", "rollout.tasks_per_worker=16", "rollout.n_global=8",
    "rollout.horizon=2", "data.synth.conversations=6", "data.synth.val_conversations=0", "metrics.prometheus=false",
]


def bench_config(overrides: list[str]) -> Config:
    return load_config(None, BENCH + list(overrides))


def run_rollout_bench(cfg: Config) -> dict:
    check_model_name(cfg.model.name)
    conversations = split(load_dataset(cfg.data), cfg.data)["train"]
    init_ray(cfg.cluster, fleet_asks(cfg))
    fleet = RolloutFleet(cfg, run="bench")
    try:
        worker = fleet.live()[0].handle
        ray.get(worker.greedy.remote([1, 2, 3], 8))  # first-call costs out of both measurements
        ray.get(worker.record_requests.remote())
        start = time.perf_counter()
        batch = fleet.run(plan_step(cfg, conversations, cfg.rollout.horizon, step=0))
        worker_s = time.perf_counter() - start
        batches = ray.get(worker.batch_stats.remote())
        raw = ray.get(worker.replay_raw.remote(max(1, round(batches["in_flight_mean"]))))
    finally:
        fleet.shutdown()
    worker_tok_s = batch.stats.generated_tokens / worker_s
    raw_tok_s = raw["generated_tokens"] / raw["wall_s"]
    return {
        "worker_tok_s": worker_tok_s,
        "raw_tok_s": raw_tok_s,
        "ratio": worker_tok_s / raw_tok_s,
        "in_flight_mean": batches["in_flight_mean"],
        "model": cfg.model.name,
        "engine": cfg.rollout.engine,
        "requests": raw["requests"],
        "worker_tokens": batch.stats.generated_tokens,
        "raw_tokens": raw["generated_tokens"],
        "worker_s": worker_s,
        "raw_s": raw["wall_s"],
    }
