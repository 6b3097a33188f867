"""Weights from the learner to every rollout engine after each update (DESIGN §4).

object_store (CPU, and any cluster): learner rank 0 puts the full HF-named state dict in the Ray
object store once; the policy store records (version, ref) for workers that start later (a
replacement, an autoscaled worker); every live worker loads it in place (`reload_weights` in
vLLM) and stamps the new version on what it generates from then on.
nccl (GPU): meant to broadcast the tensors from rank 0 straight into the vLLM workers over an
NCCL group instead of the object store. Not built yet: `auto` therefore means object_store on GPU
clusters too (correct, but a 7B state dict then crosses the object store once per update).
"""

from __future__ import annotations

import time

import ray

from actors.fleet.fleet import RolloutFleet
from learner.deepspeed_learner import Learner


def check_sync_mode(configured: str) -> None:
    """Every mode but nccl is the object store today; nccl fails here, before anything starts."""
    if configured == "nccl":
        raise ValueError("learner.weight_sync=nccl: the NCCL group with the vLLM workers is not built yet; use auto or object_store")


def sync_weights(learner: Learner, fleet: RolloutFleet) -> float:
    """Publish the learner's current weights, then push them to every live worker; returns seconds."""
    start = time.perf_counter()
    wrapped = learner.publish_weights()
    ray.get(fleet.policy_store.publish.remote(learner.version, wrapped))  # first: workers starting now pull it
    fleet.load_weights(wrapped, learner.version)
    return time.perf_counter() - start
