"""DeepSpeed plumbing for one learner rank: environment, config, engine, full state dicts.

Nothing here imports deepspeed at module level: importing it picks the accelerator, so the
environment must be set first, and the driver (which never trains) should not pay the import.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from common.config import LearnerConfig
from common.hardware import cpu_has_fast_bf16
from learner.trunk import drop_trunk

# Files of a HF model folder that are the tokenizer's, copied beside saved weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def prepare_env() -> None:
    """Before `import deepspeed`: CPU accelerator without CUDA, and a persistent JIT build cache.

    DeepSpeed JIT-compiles its `deepspeed_shm_comm` op on every start (26-75 s here) unless a
    build is cached; torch caches JIT builds in TORCH_EXTENSIONS_DIR, which by default is under
    /tmp and per user.  A folder inside the venv survives reboots and is shared by every rank.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cache = Path(sys.prefix) / "torch_extensions"
    if os.access(sys.prefix, os.W_OK):
        cache.mkdir(exist_ok=True)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache))


def build_ops() -> None:
    """Build the ops DeepSpeed JIT-compiles on this machine's accelerator into the venv's cache
    (prepare_env), once, at `make setup`: on CPU its shared-memory collective, 30-75 s that the
    first learner rank of every fresh checkout would otherwise spend compiling. No-op where the
    accelerator has no such op."""
    prepare_env()
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def resolve_backend(setting: str) -> str:
    if setting != "auto":
        return setting
    return "nccl" if torch.cuda.is_available() else "gloo"


def resolve_bf16(setting: str) -> bool:
    """auto: bf16 where the hardware computes it faster than fp32: GPUs that support it, CPUs with
    AMX, and AMD's with avx512_bf16 (common.hardware: 1.8x on an EPYC, no faster on an Intel Xeon
    with avx512_bf16 alone). fp32 elsewhere.

    bf16 logprobs differ from fp32 by ~2e-3 on average, more than the exactness tests (ranks agree,
    resume reproduces a step) absorb, so those pin `off`. `on` forces bf16 anywhere.
    """
    if setting == "on":
        return True
    if setting == "off":
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def resolve_on_off(setting: str, auto: bool) -> bool:
    return auto if setting == "auto" else setting == "on"


def resolve_shared_prefix(cfg: LearnerConfig) -> bool:
    """auto: on on CPU, where it was measured (`memr2 bench learner`); off on GPU, where the
    dense prefix-aware mask keeps SDPA off its flash kernel and nobody has measured the trade."""
    return resolve_on_off(cfg.shared_prefix, not torch.cuda.is_available())


def grad_accumulation(cfg: LearnerConfig, world_size: int) -> int:
    """Micro-batches per rank per optimizer step, so that micro * accum * world = mini_batch."""
    if cfg.mini_batch % (cfg.micro_batch * world_size):
        raise ValueError(
            f"learner.mini_batch ({cfg.mini_batch}) must be a multiple of micro_batch * num_ranks "
            f"({cfg.micro_batch} * {world_size})"
        )
    return cfg.mini_batch // (cfg.micro_batch * world_size)


def bucket_elements(trainable: int) -> int:
    """ZeRO's gradient reduce and all-gather buckets: DeepSpeed's 5e8 elements (a 1 GB bf16 buffer,
    ~2% of a 7B rank), but never more than the trainable parameters, so a small model does not
    hold a buffer larger than itself (measured: 1 GB for the 3.5M-param tiny model)."""
    return int(min(5e8, max(trainable, 1)))


def ds_config(cfg: LearnerConfig, world_size: int, bf16: bool, trainable: int = 5 * 10**8) -> dict[str, Any]:
    accum = grad_accumulation(cfg, world_size)
    bucket = bucket_elements(trainable)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.micro_batch * accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # DeepSpeed's own progress lines: off; the driver logs metrics
        "wall_clock_breakdown": False,
    }


def lr_factor(cfg: LearnerConfig, step: int) -> float:
    """lr multiplier after `step` optimizer steps: linear warm-up, then constant or cosine decay."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.lr_warmup_steps) / max(1, cfg.lr_total_steps - cfg.lr_warmup_steps))
    return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(model_dir: str, cfg: LearnerConfig, world_size: int, bf16: bool) -> Any:
    """Policy from `model_dir` wrapped in a DeepSpeed engine with a torch AdamW object.

    The optimizer is passed as an object, not named in the config: a config optimizer makes
    DeepSpeed JIT-build FusedAdam (~44 s on CPU).  Weight decay is 0: it would pull the policy
    toward zero, not toward the reference the KL term anchors it to.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    freeze_lower_layers(model, cfg.frozen_layers)
    if resolve_on_off(cfg.gradient_checkpointing, torch.cuda.is_available()):
        # Non-reentrant: works with frozen lower layers (inputs that need no grad) and ZeRO hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all tensors, without the parameter-sized temporaries of the foreach
    # implementation (measured on CPU: the optimizer step's peak fell by ~3 B/param).
    optimizer = torch.optim.AdamW(trainable, lr=cfg.resolved_lr(bf16), weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg))
    engine, *_ = deepspeed.initialize(  # DeepSpeed steps the scheduler at each optimizer step
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config(cfg, world_size, bf16, sum(p.numel() for p in trainable)),
        dist_init_required=False,
    )
    engine.train()
    return engine


def freeze_lower_layers(model: torch.nn.Module, n: int) -> None:
    """Fix the token embeddings (tied to the LM head in small models) and the first n decoder
    layers. Autograd then stops at layer n, so a step costs a forward plus the backward of the
    upper layers only: on a CPU laptop that is the difference between a few RL steps and none."""
    if n <= 0:
        return
    layers = model.get_decoder().layers
    if n >= len(layers):
        raise ValueError(f"learner.frozen_layers={n} leaves nothing to train: the model has {len(layers)} layers")
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)


def build_reference(model_dir: str, cfg: LearnerConfig, world_size: int, device: torch.device, bf16: bool) -> torch.nn.Module:
    """The frozen reference policy of the KL term, placed as `learner.reference` says.

    sharded / offload with several ranks: a ZeRO-3 inference engine, each rank holding 1/N of the
    weights (offload: in host memory) and gathering one layer at a time in the forward, so every
    rank must run the same number of reference forwards (LearnerRank pairs them with its
    backward passes, dummy ones included). One rank, or replicated: a plain full copy."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ref.eval().requires_grad_(False)
    drop_trunk(ref, cfg.frozen_layers)
    if cfg.reference == "replicated" or world_size == 1:
        return ref.to(device)
    import deepspeed

    zero = {"stage": 3}
    if cfg.reference == "offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "bf16": {"enabled": bf16},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=ref, config=config, dist_init_required=False)
    engine.eval()
    return engine  # called like the module; its forward runs ZeRO-3's gather-and-release per layer

def load_pretrained(engine: Any, directory: str) -> None:
    """A model folder's weights, copied in place into the engine's parameters, and fresh Adam
    moments. Under ZeRO-1/2 (and bf16 at stage 0) the optimizer steps fp32 master copies of
    the parameters, flat partitions of its own, and writes them back over the parameters at
    the next step: they are refreshed from the loaded weights. Under ZeRO-3 each parameter is
    a shard: they are gathered for the write, and rank 0's copy is partitioned back."""
    import deepspeed
    from safetensors import safe_open

    module, optimizer = engine.module, engine.optimizer
    targets = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers())
    files = sorted(Path(directory).glob("*.safetensors"))
    names = set()
    for f in files:
        with safe_open(f, "pt") as weights:
            names |= set(weights.keys())
    loaded = {id(targets[n]) for n in names & targets.keys()}  # tied weights: either name will do
    absent = [n for n, p in module.named_parameters() if id(p) not in loaded]
    if names - targets.keys() or absent:
        raise ValueError(f"{directory} does not hold this model's weights: unknown "
                         f"{sorted(names - targets.keys())[:3]}, absent {absent[:3]}")
    gather = contextlib.nullcontext()
    if engine.zero_optimization_stage() == 3:
        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0)
    with torch.no_grad(), gather:
        for f in files:  # file by file: one shard of a 7B folder in memory, not all of them
            with safe_open(f, "pt") as weights:
                for name in weights.keys():
                    targets[name].copy_(weights.get_tensor(name))
    if hasattr(optimizer, "refresh_fp32_params"):  # none at stage 0 in fp32: no master copy
        optimizer.refresh_fp32_params()
    getattr(optimizer, "optimizer", optimizer).state.clear()  # Adam re-initialises lazily


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """HF-named CPU copy of every weight; under ZeRO-3 every rank must call this (it gathers)."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_hf(engine: Any, state: dict[str, torch.Tensor], out_dir: str, model_dir: str) -> None:
    """A HF folder (config, safetensors, tokenizer files copied from the model dir if present),
    written beside and renamed into place: a folder with a config.json is whole, which is how a
    resumed run (or bench) knows its warm start was finished, not cut short by a kill."""
    out = Path(out_dir)
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    engine.module.save_pretrained(part, state_dict=state)
    for name in TOKENIZER_FILES:
        src = Path(model_dir) / name
        if src.is_file():
            shutil.copy2(src, part / name)
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)
