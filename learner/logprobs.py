"""Per-token logprobs (and entropy) of response tokens given their prompts, in one forward pass.

Shared by the learner (new and reference policy), tests, and weight-sync checks against a rollout
engine's logprobs, so all of them score tokens the same way: raw temperature-1 log-softmax.

Layout: prompts are LEFT-padded and responses RIGHT-padded, so every response starts at the same
column P.  Position ids are rebuilt from the attention mask, so a padded row sees exactly the
positions it would see alone.  Because the responses are aligned, `logits_to_keep` can ask the
model for the last R+1 positions only: the LM head and the [B, R, V] log-softmax then never touch
prompt positions (with a 150k vocabulary and 2k-token manager prompts, full logits would be the
largest tensor of the step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Packed:
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R] float, 1 on real response tokens
    prompt_len: int  # P: column where every response starts

    def to(self, device: torch.device | str) -> Packed:
        return Packed(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.response_mask.to(device),
            self.prompt_len,
        )


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int = 0) -> Packed:
    """Left-pad prompts and right-pad responses into one batch (see module docstring)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("pack needs as many prompts as responses, and at least one")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (it predicts the first response token)")
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, P - len(p) : P] = torch.as_tensor(list(p), dtype=torch.long)
        ids[b, P : P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        attn[b, P - len(p) : P + len(r)] = 1
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    response_mask = attn[:, P:].to(torch.float32)
    return Packed(ids, attn, position_ids, response_mask, P)


def model_input(input_ids: torch.Tensor, trunk: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tokens, or, for a reference without its trunk (learner.trunk.TrunkTap), the policy's
    hidden states where the trunk ends: they stand where the token embeddings would."""
    return {"input_ids": input_ids} if trunk is None else {"inputs_embeds": trunk}


def packed_logprobs(
    model: torch.nn.Module, packed: Packed, with_entropy: bool = False, trunk: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, R] logprob of each response token (0 on padding), and its entropy if asked; keeps grad."""
    R = packed.response_mask.shape[1]
    out = model(
        **model_input(packed.input_ids, trunk),
        attention_mask=packed.attention_mask,
        position_ids=packed.position_ids,
        logits_to_keep=R + 1,
        use_cache=False,
    )
    # Position P-1+j predicts response token j; the last position predicts nothing we scored.
    return score_tokens(out.logits[:, :-1, :], packed, with_entropy)


def score_tokens(
    logits: torch.Tensor, packed: Packed, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, R] logprob (and entropy) of each response token from the [B, R, V] logits that predict
    them; 0 on padding."""
    targets = packed.input_ids[:, packed.prompt_len :]
    token_logprobs, entropy = score_targets(logits, targets, with_entropy)
    return token_logprobs * packed.response_mask, None if entropy is None else entropy * packed.response_mask


def score_targets(
    logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Temperature-1 logprob of each target token, and the entropy of its distribution, from the
    logits [..., V] that predict it (learner.shared_prefix scores the same way)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token_logprobs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return token_logprobs, entropy


def response_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int = 0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logprobs [B, R], response mask [B, R], entropy or None) on the model's device."""
    device = next(model.parameters()).device
    packed = pack(prompts, responses, pad_id).to(device)
    logprobs, entropy = packed_logprobs(model, packed, with_entropy)
    return logprobs, packed.response_mask, entropy
