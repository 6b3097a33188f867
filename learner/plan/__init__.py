"""The resource planner (`memr2 plan`): shape, memory model, report, and its check on CPU."""

from __future__ import annotations

import logging

from common.config import Config

log = logging.getLogger("memr2.plan")


def check_fits(cfg: Config, gpu_memory_gb: float | None, ask_cluster: bool = False) -> None:
    """Stop in one line when the config does not fit GPUs of this size: given, the driver's own,
    or (ask_cluster, once Ray is up) a GPU of the cluster's. Nothing to check without a size."""
    import torch

    if ask_cluster:
        if gpu_memory_gb is not None or torch.cuda.is_available():
            return  # checked before Ray started
        gpu_memory_gb = cluster_gpu_memory_gb()
    elif gpu_memory_gb is None and torch.cuda.is_available():
        gpu_memory_gb = _device_memory_gb()
    if gpu_memory_gb is None:
        return
    from learner.plan.report import check_plan, make_plan

    check_plan(make_plan(cfg, gpu_memory_gb))


def resolve_offload_states(cfg: Config, gpu_memory_gb: float | None) -> str:
    """learner.offload_states as `memr2 plan` resolves it for cluster.colocate: on or off as set;
    auto on exactly when the awake engine and the learner with its optimizer state and fp32 master
    resident do not fit one GPU (the plan's rollout phase). Without a GPU size auto is on: slower
    (the states cross to host and back every step), never out of memory for want of it."""
    if cfg.learner.offload_states != "auto":
        return cfg.learner.offload_states
    if gpu_memory_gb is None:
        return "on"
    from learner.plan.report import make_plan

    return make_plan(cfg, gpu_memory_gb)["colocate"]["offload_states_resolved"] if cfg.cluster.colocate else "off"


def cluster_gpu_memory_gb(timeout_s: float = 60.0) -> float | None:
    """A GPU's memory as a one-GPU task on the cluster sees it (the driver's node, a head, often
    has none). None when the cluster has no GPU or none is free within the timeout (an autoscaler
    still adding nodes): the run goes on unchecked, and says so."""
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        return None
    ref = ray.remote(num_gpus=1)(_device_memory_gb).remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        log.warning("memr2: no GPU free within %.0f s to size the plan against; not checked", timeout_s)
        return None
    return ray.get(ref)


def _device_memory_gb() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 1e9
