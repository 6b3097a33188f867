"""LoGo-GRPO's equations (DESIGN §3), in one file to hold against the design.

Two pieces:

1. Group advantages.  A group is one conversation's session t over its n global rollouts, or one
   local group of m branches re-run from an anchor's snapshot.  Its rewards are z-scored:

       A(i) = (r(i) - mean_j r(j)) / (std_j r(j) + eps)        std: population std (ddof=0)

   The z-score is over the group's *rollouts* (one reward per rollout index), never over rows:
   a rollout contributes one row per generation step and rollouts take different numbers of
   steps, so a row-level mean would let talkative rollouts move the baseline.  Every step of
   rollout i gets A(i).  Equal rewards give all-zero advantages (the caller drops such groups).

2. The unified loss over one batch of steps, global and local pooled.  Per sample s (one
   extractor or manager generation, response tokens 1..T_s):

       log_rho = min(mean_t(logp_new - logp_old), cap)       rho = exp(log_rho)
       pg      = min(rho*A, clip(rho, 1-eps, 1+eps)*A)
       pg      = max(pg, c*A)                     if A < 0   (dual clip)
       kl      = mean_t(exp(ref - new) - (ref - new) - 1)    (k3 estimator, >= 0)
       ent     = mean_t(entropy_t)
       obj     = pg - beta*kl + eta*ent

       loss    = -sum_s w_s * obj_s

   logp_old is the behaviour policy's: the engine's logprobs of the tokens it sampled
   (algo.off_policy=behaviour).  With algo.off_policy=proximal the ratio is taken against the
   proximal policy instead: the learner's weights before this update, logprobs recomputed
   without gradient (what verl and OpenRLHF do by default), so the update depends on the
   learner's numerics only, not on the engine's (bf16 engines' logprobs depend on which requests
   shared their batch).  With algo.off_policy=decoupled (AReaL's decoupled PPO, for rows from an
   older policy), the behaviour policy also enters, as a truncated importance weight:

       log_rho = min(mean_t(logp_new - logp_prox), cap)
       w_b     = min(exp(mean_t(logp_prox - logp_old)), tis_cap)          (no gradient; decoupled)
       pg      = w_b * [the clipped, dual-clipped surrogate above]

   The cap is applied from above only.  Its purpose is to keep exp() finite; below, rho -> 0 is
   harmless, and a floor would zero the gradient exactly where a positive-advantage sample
   whose probability collapsed needs it most.  The cap never cuts a gradient the objective would
   otherwise pass: at log_rho = 3, rho = e^3 ~ 20 > 1+eps (A>0 already clipped) and > c = 3
   (A<0 already dual-clipped); this holds whenever e^cap >= max(1+eps, c).

   Pooling weights w (sum to 1 over the pool):
     local_weight None  -> w_s = 1/N: one mean over all samples, so each kind weighs by its share
                           of samples (what the reference code does);
     local_weight = lam -> (1-lam)*mean(global samples) + lam*mean(local samples).  A kind absent
                           from the pool contributes nothing and the other kind gets weight 1,
                           so a batch without local groups is not silently scaled by (1-lam).
   The pool can be larger than the tensors passed in (a mini-batch split into micro-batches and
   data-parallel ranks): `pool_weights` takes the pool's counts, and the loss then returns that
   micro-batch's share of the pooled loss, so the shares add up to the mini-batch's loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import torch

from common.config import AlgoConfig


def group_advantages(rewards_by_rollout: Sequence[float], eps: float) -> list[float]:
    """z-score of one group's rewards, one per rollout/branch; population std (ddof=0)."""
    n = len(rewards_by_rollout)
    if n == 0:
        return []
    mean = sum(rewards_by_rollout) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards_by_rollout) / n)
    return [(r - mean) / (std + eps) for r in rewards_by_rollout]


def with_advantages(table: pa.Table, eps: float) -> pa.Table:
    """The group's table with `advantage` set on every row from its rollout's z-scored reward."""
    if table.num_rows == 0:
        return table
    for col in ("group_id", "group_kind"):
        if pc.count_distinct(table[col]).as_py() != 1:
            raise ValueError(f"a group table must hold one {col}, got {pc.unique(table[col]).to_pylist()}")
    rollouts = table["rollout"].to_pylist()
    rewards = table["reward"].to_pylist()
    reward_of: dict[int, float] = {}
    for k, r in zip(rollouts, rewards):
        if reward_of.setdefault(k, r) != r:
            raise ValueError(f"rollout {k} of group {table['group_id'][0]} has more than one reward")
    keys = sorted(reward_of)
    adv_of = dict(zip(keys, group_advantages([reward_of[k] for k in keys], eps)))
    idx = table.schema.get_field_index("advantage")
    column = pa.array([adv_of[k] for k in rollouts], type=table.schema.field(idx).type)
    return table.set_column(idx, table.schema.field(idx), column)


def pool_weights(
    is_local: torch.Tensor,
    local_weight: float | None,
    n_global: int | None = None,
    n_local: int | None = None,
) -> torch.Tensor:
    """Per-sample weight w_s of the pooled mean (module docstring); counts default to this batch's."""
    is_local = is_local.bool()
    ng = int((~is_local).sum()) if n_global is None else int(n_global)
    nl = int(is_local.sum()) if n_local is None else int(n_local)
    if local_weight is None:
        w_global = w_local = 1.0 / max(ng + nl, 1)
    else:
        if not 0.0 <= local_weight <= 1.0:
            raise ValueError(f"local_weight must lie in [0, 1], got {local_weight}")
        lam = local_weight if ng and nl else float(nl > 0)  # an absent kind hands its weight over
        w_global = (1.0 - lam) / max(ng, 1)
        w_local = lam / max(nl, 1)
    ones = torch.ones(is_local.shape, dtype=torch.float64)
    return torch.where(is_local, ones * w_local, ones * w_global)


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's real tokens; an empty response counts as 0 (not NaN)."""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def clipped_objective(rho: torch.Tensor, adv: torch.Tensor, eps: float, dual: float) -> torch.Tensor:
    """PPO's pessimistic clipped surrogate, with the dual clip bounding it below for A < 0."""
    surrogate = torch.minimum(rho * adv, rho.clamp(1.0 - eps, 1.0 + eps) * adv)
    return torch.where(adv < 0, torch.maximum(surrogate, dual * adv), surrogate)


def k3_kl(new_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token low-variance KL(new || ref) estimate: exp(d) - d - 1 with d = ref - new."""
    d = ref_logprobs - new_logprobs
    return torch.exp(d) - d - 1.0


def logo_grpo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    is_local: torch.Tensor,
    cfg: AlgoConfig,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    prox_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The pooled LoGo-GRPO loss of a batch of steps ([B, L] token tensors, [B] per sample).

    `weights`: the pooled-mean weights (`pool_weights`); default: this batch is the whole pool.
    `prox_logprobs`: the proximal policy's, for algo.off_policy=proximal or decoupled (module docstring).
    Metrics: pg_loss, kl, entropy are pooled like the loss (loss = pg_loss + beta*kl - eta*entropy);
    clip_frac (share of samples whose ratio gradient the clip or dual clip cuts), dual_clip_frac,
    cap_frac, ratio_mean and tis_weight_mean are plain means over samples; n_global and n_local
    are counts.
    """
    mask = mask.to(new_logprobs.dtype)
    if weights is None:
        weights = pool_weights(is_local, cfg.local_weight)
    weights = weights.to(new_logprobs)
    adv = advantages.to(new_logprobs)

    anchor = old_logprobs if prox_logprobs is None else prox_logprobs  # proximal, decoupled: the learner's
    log_ratio = token_mean(new_logprobs - anchor, mask)
    capped = log_ratio > cfg.log_ratio_cap
    rho = torch.exp(log_ratio.clamp(max=cfg.log_ratio_cap))
    pg = clipped_objective(rho, adv, cfg.clip_eps, cfg.dual_clip)
    behaviour = torch.ones_like(pg)
    if prox_logprobs is not None and cfg.off_policy == "decoupled":
        behaviour = torch.exp(token_mean(prox_logprobs - old_logprobs, mask)).clamp(max=cfg.tis_cap).detach()
        pg = behaviour * pg

    zero = torch.zeros_like(pg)
    use_kl = cfg.kl_beta > 0 and ref_logprobs is not None
    kl = token_mean(k3_kl(new_logprobs, ref_logprobs), mask) if use_kl else zero
    ent = token_mean(entropy, mask) if entropy is not None else zero
    obj = pg - cfg.kl_beta * kl + cfg.entropy_eta * ent
    loss = -(weights * obj).sum()

    with torch.no_grad():
        r = rho.detach()
        upper = (adv > 0) & (r > 1 + cfg.clip_eps)
        lower = (adv < 0) & (r < 1 - cfg.clip_eps)
        dual = (adv < 0) & (r > cfg.dual_clip)
        n = max(len(r), 1)
        metrics = {
            "pg_loss": float(-(weights * pg).sum()),
            "kl": float((weights * kl).sum()),
            "entropy": float((weights * ent).sum()),
            "clip_frac": float((upper | lower | dual).sum()) / n,
            "dual_clip_frac": float(dual.sum()) / n,
            "cap_frac": float(capped.sum()) / n,
            "ratio_mean": float(r.sum()) / n,
            "tis_weight_mean": float(behaviour.sum()) / n,
            "n_global": int((~is_local.bool()).sum()),
            "n_local": int(is_local.bool().sum()),
        }
    return loss, metrics


def mismatch(learner_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """The train/inference gap on the same tokens, as sums over real tokens: (sum |d|, sum k3,
    tokens) with d = learner - engine. k3 = exp(d) - d - 1 estimates KL(engine || learner) from
    the engine's own samples: how far bf16 engines and an fp32 learner disagree."""
    d = (learner_logprobs - engine_logprobs) * mask
    return float(d.abs().sum()), float(((torch.exp(d) - d - 1.0) * mask).sum()), float(mask.sum())
