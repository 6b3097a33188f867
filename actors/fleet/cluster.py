"""Joining or starting the Ray cluster the job runs on."""

from __future__ import annotations

import math
import os

import ray

from actors.fleet.scaling import autoscale_bounds
from common.config import ClusterConfig, Config

# Every actor runs offline (models come from folders or packages) and quietly.
ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}


Asks = dict[str, list[dict[str, float]]]  # what, e.g. "rollout actor" -> one resource bundle per actor


def fleet_asks(cfg: Config) -> Asks:
    """The rollout fleet at its minimum size: what the cluster must hold for the job to start."""
    from actors.fleet.fleet import worker_resources

    return {"rollout actor": [worker_resources(cfg)] * autoscale_bounds(cfg)[0]}


def init_ray(cfg: ClusterConfig, asks: Asks) -> None:
    """`address=None` starts a local cluster (a laptop, CI); "auto" or ray://... joins one
    (under `ray job submit` Ray sets RAY_ADDRESS and this joins the job's cluster). Then the
    cluster must be able to hold every actor the job `asks` for (`require_resources`).

    A local cluster gets at least the CPUs asked for: rollouts and updates alternate, so the
    rollout actors and learner ranks can all be placed at once on a small machine without
    competing for its cores."""
    if not ray.is_initialized():
        _start_or_join(cfg, sum(b.get("CPU", 0.0) for group in asks.values() for b in group))
    require_resources(asks, cfg.placement_timeout_s)


def _start_or_join(cfg: ClusterConfig, cpus_needed: float) -> None:
    local = cfg.address is None and not os.environ.get("RAY_ADDRESS")  # set by `ray job submit`
    ray.init(
        address=cfg.address,
        num_cpus=(cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed))) if local else None,
        # A job joining a cluster brings its own runtime env (deploy/runtime_env.yaml); Ray
        # refuses to merge a second one into it.
        runtime_env={"env_vars": ACTOR_ENV} if local else None,
        include_dashboard=False if local else None,
        log_to_driver=cfg.log_to_driver,
        configure_logging=False,
    )


def require_resources(asks: Asks, timeout_s: float | None) -> None:
    """Stop with one line, instead of waiting forever, when the cluster cannot hold the job's actors.

    Ray queues an actor that no node can take until such a node joins, so a job asking for GPUs on
    a CPU cluster used to hang silently. Every bundle of `asks` is reserved at once as a placement
    group, a probe that is released straight away. It may take up to `timeout_s` (an autoscaler
    adds nodes meanwhile); None waits as Ray does.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{k: v for k, v in b.items() if v > 0} for group in asks.values() for b in group]
    if timeout_s is None or not bundles:
        return
    probe = placement_group(bundles, strategy="PACK")
    try:
        placed = probe.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(probe)
    if not placed:
        wanted = " + ".join(f"{len(group)} {what}(s) of {_resources(group[0])}" for what, group in asks.items() if group)
        raise ValueError(
            f"the cluster cannot hold {wanted} (it has {_resources(ray.cluster_resources())}) after "
            f"{timeout_s:g} s: lower rollout.num_actors / cpus_per_actor / gpus_per_actor or "
            "learner.num_ranks / cpus_per_rank / gpus_per_rank, or add nodes"
        )


def _resources(bundle: dict[str, float]) -> str:
    return ", ".join(f"{bundle.get(k, 0):g} {k}" for k in ("CPU", "GPU"))
