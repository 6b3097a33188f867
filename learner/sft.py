"""The warm start's objective: supervised next-token likelihood of the gold responses.

Not part of LoGo-GRPO; it shares the learner's batching and pooling so a warm start is the same
DeepSpeed job with another loss. Token-mean per sample, pooled like the RL samples, so long and
short targets weigh alike, as the RL loss's length-normalised ratio does.
"""

from __future__ import annotations

import torch

from learner.logo_grpo import token_mean


def sft_loss(new_logprobs: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    nll = -token_mean(new_logprobs, mask)
    loss = (weights * nll).sum()
    ent = float((weights * token_mean(entropy, mask)).sum()) if entropy is not None else 0.0
    metrics = {"pg_loss": float(loss.detach()), "kl": 0.0, "entropy": ent, "clip_frac": 0.0, "dual_clip_frac": 0.0, "cap_frac": 0.0, "ratio_mean": 1.0, "tis_weight_mean": 1.0}
    return loss, metrics
