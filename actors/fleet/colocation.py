"""cluster.colocate: learner rank i and rollout worker i share one GPU (the paper's 4 GPUs).

One placement group of learner.num_ranks bundles, packed; bundle i holds rank i and worker i, each
with its share of the GPU (fractional shares that add up to one: the worker's
rollout.gpus_per_actor, the rank the rest), so Ray never places two ranks or two engines on one
GPU. The fleet is fixed at one worker a bundle; a worker lost is replaced on its bundle, a learner
restarted in the same group (learner.deepspeed_learner). The group outlives both; the driver
removes it at the end.
"""

from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.config import Config

log = logging.getLogger("memr2.fleet")


def pair_resources(cfg: Config, rank: dict[str, float], worker: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(rank, worker) resources inside a bundle. On GPU the worker keeps its rollout.gpus_per_actor
    (0.5 unless set) and the rank takes the rest, unless learner.gpus_per_rank says otherwise."""
    rank, worker = dict(rank), dict(worker)
    if rank.get("GPU", 0.0) > 0 and worker.get("GPU", 0.0) == 0:
        worker["GPU"] = 0.5
    if cfg.learner.gpus_per_rank is None and rank.get("GPU", 0.0) > 0:
        rank["GPU"] = 1.0 - worker["GPU"]
    return rank, worker


def pair_bundle(rank: dict[str, float], worker: dict[str, float]) -> dict[str, float]:
    """The bundle a rank and its worker share: their resources added."""
    bundle = {k: rank.get(k, 0.0) + worker.get(k, 0.0) for k in rank.keys() | worker.keys()}
    return {k: v for k, v in sorted(bundle.items()) if v > 0}


class Colocation:
    def __init__(self, rank: dict[str, float], worker: dict[str, float], pairs: int) -> None:
        self.rank, self.worker, self.pairs = rank, worker, pairs
        self._told = False  # that the engines cannot sleep here
        self.bundle = pair_bundle(rank, worker)
        self.group = placement_group([self.bundle] * pairs, strategy="PACK")

    def on(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        """Where rank `bundle` and worker `bundle` go."""
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)

    def nodes(self) -> dict[int, str]:
        """Bundle index -> the node it is on (once placed)."""
        return dict(ray.util.placement_group_table(self.group).get("bundles_to_node_id", {}))

    def call(self, slots: list, method: str, arg: object) -> float:
        """A sleep-mode call on every live worker's engine; seconds. On CPU the engines have no
        sleep mode and stay awake (said once)."""
        start = time.perf_counter()
        done = ray.get([getattr(s.handle, method).remote(arg) for s in slots])
        if not any(done) and not self._told:
            log.info("memr2: colocated engines stay awake through updates: no sleep mode here (vLLM's needs CUDA)")
            self._told = True
        return time.perf_counter() - start

    def remove(self) -> None:
        remove_placement_group(self.group)
