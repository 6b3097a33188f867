"""`memr2 warmstart`: supervised warm start on a synthetic world's gold facts and operations.

A model as small as the embedded default's cannot write a parsable fact or operation before it
has seen some, and RL has no signal while every group ties. The warm start teaches the output
format and the copying on the same prompts a rollout builds, with the same DeepSpeed learner and
another loss (learner.sft); its result is the policy RL starts from, and `val_f1_start` is
measured on it, so the RL gain is reported separately from the warm start's.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

from actors.engines.models import ChatEngineBase, resolve_model
from actors.agent.prompts import context_tokens
from actors.agent.supervision import supervised_examples
from common.config import Config, DataConfig
from common.data import load_dataset
from common.types import Conversation, StepSample, samples_to_table
from learner.deepspeed_learner import Learner


def warm_model(cfg: Config, run_path: Path) -> tuple[str | Path, dict | None]:
    """What RL starts from: the configured model's name (each learner rank resolves it on its own
    node), or its warm start, made once per run in the run directory, which every node shares."""
    if not cfg.train.warmstart.enabled:
        return cfg.model.name, None
    out = run_path / "warmstart"
    if (out / "config.json").is_file():  # a resumed run reuses its warm start
        return out, {"reused": True}
    return out, run_warmstart(cfg, cfg.model.name, out)


def sft_rows(cfg: Config, model_dir: Path, conversations: list[Conversation]):
    tok = ChatEngineBase(model_dir, context_tokens(cfg))
    end = tok.tokenizer.eos_token_id
    samples = []
    for conv in conversations:
        for i, ex in enumerate(supervised_examples(conv, cfg)):
            response = tok.tokenizer.encode(ex.target, add_special_tokens=False) + [end]
            prompt = tok.chat_prompt(ex.system, ex.user)
            samples.append(StepSample(ex.role, prompt, response, [0.0] * len(response), conv.sample_id, 0, f"sft/{conv.sample_id}/{i}", "global", 0))
    return samples_to_table(samples)


def _node_cpus() -> float:
    """CPUs of the largest node (a rank cannot span nodes), capped by this machine's cores: more
    torch threads than cores only thrash. 1 without a Ray cluster."""
    import ray

    if not ray.is_initialized():
        return 1.0
    largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)
    return min(largest, os.cpu_count() or 1)


def run_warmstart(cfg: Config, base: str | Path, out: Path) -> dict:
    """`base`: a model name or a folder every node sees; `out` must be one too (the ranks write it)."""
    start = time.perf_counter()
    ws = cfg.train.warmstart
    conversations = load_dataset(DataConfig(source="synthetic", synth=ws.synth))
    rows = sft_rows(cfg, resolve_model(str(base)), conversations)  # the driver's own copy, for its tokenizer
    steps = ws.epochs * math.ceil(rows.num_rows / ws.mini_batch)
    learner_cfg = cfg.learner.model_copy(update={
        "lr": ws.lr, "lr_schedule": "cosine", "lr_warmup_steps": ws.warmup_steps, "lr_total_steps": steps,
        "mini_batch": ws.mini_batch, "micro_batch": ws.micro_batch, "ppo_epochs": 1,
        # Nothing else runs yet: the ranks share every core of a node.
        "cpus_per_rank": max(1.0, _node_cpus() / cfg.learner.num_ranks),
    })
    algo = cfg.algo.model_copy(update={"kl_beta": 0.0})  # no reference model for a likelihood loss
    print(f"warm start: {rows.num_rows} examples from {len(conversations)} synthetic conversations, {ws.epochs} epoch(s)", file=sys.stderr)
    losses = []
    with Learner(str(base), algo, learner_cfg, cfg.seed) as learner:
        for _ in range(ws.epochs):
            losses.append(learner.update(rows, objective="sft")["loss"])
            print(f"warm start: epoch {len(losses)}/{ws.epochs} loss {losses[-1]:.3f}", file=sys.stderr)
        learner.save_pretrained(str(out))
    return {
        "examples": rows.num_rows,
        "epochs": ws.epochs,
        "loss_first_epoch": losses[0],
        "loss_last_epoch": losses[-1],
        "response_tokens_mean": statistics.fmean(len(r) for r in rows["response_ids"].to_pylist()),
        "wall_s": time.perf_counter() - start,
    }
