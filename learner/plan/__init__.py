"""The resource planner (`memr2 plan`): shape, memory model, report, and its check on CPU."""

from __future__ import annotations

from common.config import Config


def check_fits(cfg: Config, gpu_memory_gb: float | None) -> None:
    """Stop in one line when the config does not fit GPUs of this size (or of the driver's own
    GPU); a CPU run with no size given has nothing to check."""
    import torch

    if gpu_memory_gb is None and not torch.cuda.is_available():
        return
    from learner.plan.report import check_plan, make_plan

    check_plan(make_plan(cfg, gpu_memory_gb))
