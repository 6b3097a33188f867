"""`memr2 bench sync`: what one weight sync costs in each mode, against the wire it runs on.

SmolLM2 (model.name=smollm2), one learner rank and two engines. Each repeat times, side by side in
one run: a collective sync, an object-store sync, and a raw `torch.distributed` broadcast of the
bytes a collective sync sends, in a group of the same three processes (learner rank 0 and the two
engines; gloo on CPU, NCCL on GPU). It prints the medians, and ratio = collective_s / raw_broadcast_s.

A sync is timed as `sync_weights` blocks the training loop. The collective sync's object-store copy
for late joiners (learner.weight_sync) is finished before the next measurement starts, so it
never overlaps one.

What it showed on 2 CPU cores (SmolLM2, 269 MB in bf16): the raw broadcast takes 0.15-0.2 s; a
collective sync adds what each engine does with the bytes, vLLM's layerwise reload, ~0.3 s a
SmolLM2 engine even alone (cProfile: 0.13 s re-packing every linear layer for oneDNN, 0.07 s of
copies), which the object-store path pays too. Bucket size matters on CPU: buckets up to 32 MB
(glibc's largest heap block) are reused across syncs, larger ones are fresh pages to fault in
every time (16 MB: 0.55-0.8 s a sync; the 256 MB default: 0.7-1.7 s).
"""

from __future__ import annotations

import statistics
import time

import ray
import torch

from actors.engines.weight_transfer import open_group
from actors.fleet.cluster import fleet_asks, init_ray
from actors.fleet.fleet import RolloutFleet
from common.config import load_config
from learner.deepspeed_learner import Learner, rank_resources
from learner.weight_sync import sync_weights

OVERRIDES = [
    "model.name=smollm2",
    "rollout.num_actors=2",
    "rollout.cpus_per_actor=0.5",
    "learner.num_ranks=1",
    "learner.cpus_per_rank=1",
    "algo.kl_beta=0",  # no reference model: it plays no part in a sync
    "cluster.num_cpus=2",
    "metrics.prometheus=false",
]


def run_sync_bench(repeats: int = 3, overrides: list[str] | None = None) -> dict:
    cfg = load_config(None, OVERRIDES + list(overrides or []))
    init_ray(cfg.cluster, {**fleet_asks(cfg), "learner rank": [rank_resources(cfg.learner)] * cfg.learner.num_ranks})
    learner = Learner(cfg.model.name, cfg.algo, cfg.learner, cfg.seed)
    fleet = RolloutFleet(cfg, run="bench-sync")
    try:
        _sync(learner, fleet, "collective")  # forms the group; a first pass of each warms up
        _sync(learner, fleet, "object_store")
        nbytes = learner.transfer_group.bytes
        raw = RawBroadcast(learner, fleet, nbytes)
        raw.time()
        times: dict[str, list[float]] = {"collective": [], "object_store": [], "raw": []}
        for _ in range(repeats):
            times["collective"].append(_sync(learner, fleet, "collective"))
            times["object_store"].append(_sync(learner, fleet, "object_store"))
            times["raw"].append(raw.time())
        raw.close()
    finally:
        fleet.shutdown()
        learner.shutdown()
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"bytes": nbytes, "engines": len(raw.workers), "collective_s": median["collective"],
            "object_store_s": median["object_store"], "raw_broadcast_s": median["raw"],
            "ratio": median["collective"] / median["raw"]}


def _sync(learner: Learner, fleet: RolloutFleet, mode: str) -> float:
    learner.cfg = learner.cfg.model_copy(update={"weight_sync": mode})
    return sync_weights(learner, fleet)  # a collective sync makes no copy for late joiners


class RawBroadcast:
    """A plain broadcast from learner rank 0 to the engines' processes, in a group of its own."""

    def __init__(self, learner: Learner, fleet: RolloutFleet, nbytes: int) -> None:
        slots = fleet.live()
        self.workers = [s.handle for s in slots]
        self.members = [learner.ranks[0], *self.workers]  # rank 0 sends, as in a collective sync
        host, port = ray.get(learner.ranks[0].address.remote())
        backend = slots[0].info["transfer_backend"]
        ray.get([a.__ray_call__.remote(_open, backend, host, port, rank, len(self.members), nbytes)
                 for rank, a in enumerate(self.members)])

    def time(self) -> float:
        start = time.perf_counter()
        ray.get([a.__ray_call__.remote(_broadcast) for a in self.members])
        return time.perf_counter() - start

    def close(self) -> None:
        ray.get([a.__ray_call__.remote(_close) for a in self.members])


# Run inside the member actors (Ray's __ray_call__ hands them the actor instance).

def _open(actor, backend: str, host: str, port: int, rank: int, world_size: int, nbytes: int) -> None:
    actor.bench_group = open_group(backend, host, port, rank, world_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    actor.bench_buffer = torch.ones(nbytes, dtype=torch.uint8, device=device)


def _broadcast(actor) -> None:
    actor.bench_group.broadcast(actor.bench_buffer, src=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _close(actor) -> None:
    actor.bench_group.destroy()
    del actor.bench_group, actor.bench_buffer
