"""Joining or starting the Ray cluster the job runs on."""

from __future__ import annotations

import math
import os

import ray

from common.config import ClusterConfig

# Every actor runs offline (models come from folders or packages) and quietly.
ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}


def init_ray(cfg: ClusterConfig, cpus_needed: float = 0) -> None:
    """`address=None` starts a local cluster (a laptop, CI); "auto" or ray://... joins one
    (under `ray job submit` Ray sets RAY_ADDRESS and this joins the job's cluster).

    A local cluster gets at least `cpus_needed` logical CPUs: rollouts and updates alternate, so
    the rollout actors and learner ranks can all be placed at once on a small machine without
    competing for its cores."""
    if ray.is_initialized():
        return
    local = cfg.address is None and not os.environ.get("RAY_ADDRESS")  # set by `ray job submit`
    ray.init(
        address=cfg.address,
        num_cpus=(cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed))) if local else None,
        # A job joining a cluster brings its own runtime env (deploy/runtime_env.yaml sets the same
        # variables); Ray refuses to merge a second one into it.
        runtime_env={"env_vars": ACTOR_ENV} if local else None,
        include_dashboard=False if local else None,
        log_to_driver=cfg.log_to_driver,
        configure_logging=False,
    )
