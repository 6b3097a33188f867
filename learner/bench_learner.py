"""`memr2 bench learner`: one embedded-default step's rows through the update, with and without
shared prompt prefixes (learner.shared_prefix), side by side in one run.

The rows are real: the warm-started embedded policy's rollouts of one training step (the fleet
then stops). Each arm is a fresh learner from the same weights, running `repeats` updates on the
same rows; its time is the fastest. The shared arm, with frozen layers, computes the step's
frozen trunk once (learner.trunk.TrunkCache). The gradient check runs in this process, in fp32,
on the first mini-batch the learner would form: the pooled LoGo-GRPO loss's gradient computed
both ways, as the learner computes them, and the largest absolute difference over every trained
parameter (`max_grad_diff`) next to the largest gradient entry (`max_grad`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actors.fleet.cluster import init_ray
from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
from common.config import Config, load_config
from learner.batching import Rows, plan_epoch
from learner.deepspeed_learner import Learner
from learner.engine import freeze_lower_layers
from learner.logo_grpo import logo_grpo_loss, pool_weights
from learner.logprobs import pack, packed_logprobs
from learner.shared_prefix import pack_shared, shared_logprobs
from learner.train import job_asks, load_data
from learner.trunk import TrunkCache, trunk_passes, upper_layers
from learner.warmstart import run_warmstart
from learner.weight_sync import sync_weights


def run_learner_bench(overrides: list[str] | None = None, repeats: int = 2, rows_file: str | None = None) -> dict:
    """`rows_file`: a Parquet file of step rows; read if it exists (no warm start, no rollouts:
    the model is then the one they came from, model.name), else written with this run's rows."""
    cfg = load_config(None, ["metrics.prometheus=false", *(overrides or [])])
    init_ray(cfg.cluster, job_asks(cfg))
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as tmp:
        model = Path(tmp) / "warmstart"
        given = rows_file is not None and Path(rows_file).is_file()
        if given:
            model, rows = cfg.model.name, pq.read_table(rows_file)
        elif cfg.train.warmstart.enabled:
            run_warmstart(cfg, cfg.model.name, model)
        else:
            model = cfg.model.name
        data = load_data(cfg)["train"][: cfg.train.conversations_per_step]
        arms: dict[str, dict] = {}
        for arm in ("unshared", "shared"):
            learner_cfg = cfg.learner.model_copy(update={"shared_prefix": "on" if arm == "shared" else "off",
                                                         "gradient_checkpointing": "off"})
            with Learner(str(model), cfg.algo, learner_cfg, cfg.seed) as learner:
                if arm == "unshared" and not given:
                    rows = _one_step_rows(cfg, learner, data)
                    if rows_file is not None:
                        pq.write_table(rows, rows_file)
                times, metrics = [], {}
                for _ in range(repeats):
                    start = time.perf_counter()
                    metrics = learner.update(rows)
                    times.append(time.perf_counter() - start)
                    print(f"bench learner: {arm} update {times[-1]:.1f}s", file=sys.stderr)
                arms[arm] = {"s": min(times), **{k: metrics[k] for k in ("prefix_token_ratio", "trunk_token_ratio")}}
        grad_diff, grad_max = _gradient_check(cfg, str(model), rows)
    return {
        "rows": rows.num_rows,
        "shared_s": arms["shared"]["s"],
        "unshared_s": arms["unshared"]["s"],
        "speedup": arms["unshared"]["s"] / arms["shared"]["s"],
        "prefix_token_ratio": arms["shared"]["prefix_token_ratio"],
        "trunk_token_ratio": arms["shared"]["trunk_token_ratio"],
        "max_grad_diff": grad_diff,
        "max_grad": grad_max,
    }


def _one_step_rows(cfg: Config, learner: Learner, conversations: list) -> pa.Table:
    fleet = RolloutFleet(cfg, run="bench-learner")
    try:
        sync_weights(learner, fleet)  # the engines roll out the warm-started policy
        batch = fleet.run(plan_step(cfg, conversations, cfg.curriculum.stages[0].horizon, 0))
    finally:
        fleet.shutdown()
    if not batch.groups:
        raise RuntimeError("bench learner: the step's groups all tied (no rows to update on)")
    return learner.prepare([g.table for g in batch.groups])


def _gradient_check(cfg: Config, model_dir: str, rows: pa.Table) -> tuple[float, float]:
    """fp32 gradients of the first mini-batch's pooled loss, unshared and shared, each as the
    learner computes it: with frozen layers, the shared one from the step's cached trunk."""
    from transformers import AutoModelForCausalLM

    from actors.engines.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(model_dir)), dtype=torch.float32)
    frozen = cfg.learner.frozen_layers
    freeze_lower_layers(model, frozen)
    model.train()
    shard = Rows.from_table(rows)
    n_mini = max(1, -(-len(shard) // cfg.learner.mini_batch))
    together = shard.drawn_together(cfg.learner.mini_batch_by)
    first = plan_epoch(len(shard), n_mini, 1, torch.Generator().manual_seed(0), together)[0][0]
    mini = shard.select(first)
    cache = TrunkCache.build(model, None, frozen, shard, trunk_passes(shard), torch.device("cpu")) if frozen else None
    grads = []
    for shared in (False, True):
        model.zero_grad()
        if not shared:
            packed = pack(mini.prompts, mini.responses)
            new, _ = packed_logprobs(model, packed)
        else:
            packed = pack_shared(mini.prompts, mini.responses)
            with upper_layers(model, frozen) if cache else nullcontext():
                new, _ = shared_logprobs(model, packed, trunk=cache.inputs(first, packed) if cache else None)
        mask = packed.response_mask
        is_local = torch.tensor(mini.is_local)
        loss, _ = logo_grpo_loss(new, mini.old_logprobs_tensor(mask.shape[1]), mask, torch.tensor(mini.advantages),
                                 is_local, cfg.algo, weights=pool_weights(is_local, cfg.algo.local_weight))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    unshared, shared = grads
    diff = max(float((unshared[n] - shared[n]).abs().max()) for n in unshared)
    return diff, max(float(g.abs().max()) for g in unshared.values())
