"""Joining or starting the Ray cluster the job runs on."""

from __future__ import annotations

import ray

from common.config import ClusterConfig

# Every actor runs offline (models come from folders or packages) and quietly.
ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}


def init_ray(cfg: ClusterConfig) -> None:
    """`address=None` starts a local cluster (a laptop, CI); "auto" or ray://... joins one
    (under `ray job submit` Ray sets RAY_ADDRESS and this joins the job's cluster)."""
    if ray.is_initialized():
        return
    ray.init(
        address=cfg.address,
        num_cpus=cfg.num_cpus if cfg.address is None else None,
        runtime_env={"env_vars": ACTOR_ENV},
        include_dashboard=False if cfg.address is None else None,
        log_to_driver=cfg.log_to_driver,
        configure_logging=False,
    )
