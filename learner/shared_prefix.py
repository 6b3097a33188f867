"""Shared-prompt training: a prompt prefix several samples of a micro-batch share is computed once.

The n lanes of a global group send the extractor the same chunk prompt (it does not see the
memory), a local group's m branches re-send it, and manager prompts open with the same
instructions. Scoring each sample alone computes those prefixes once per sample; here the
micro-batch is one packed sequence, without padding:

    [prefix A | rest a1 + response a1 | rest a2 + response a2 | prefix B | rest b1 + response b1 ...]

with a prefix-aware attention mask: a prefix attends causally to itself; each sample's segment
attends causally to itself and to its cluster's prefix, nothing else. Position ids restart
where each sample would have them alone (the segment continues its prefix's). Every token so sees
exactly the tokens, at exactly the positions, it sees when scored alone: logprobs and gradients
equal `packed_logprobs`' up to floating point, and the backward passes through each prefix once.
Only the positions that predict response tokens reach the LM head (`logits_to_keep` as indices).

The mask is dense ([N, N] for N packed tokens), so attention costs N^2 where scoring alone costs
the sum of each sample's square; at the micro-batch sizes a token budget allows that is small
next to the linear layers. It needs an attention that takes an arbitrary mask (sdpa, eager):
learner.engine.resolve_shared_prefix turns it on by default on CPU only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learner.logprobs import model_input, score_targets

# A shared prefix shorter than this is not worth splitting the prompts for.
MIN_SHARED = 16


@dataclass(slots=True)
class SharedPacked:
    input_ids: torch.Tensor  # [1, N] every prefix once, then each sample's rest of prompt + response
    position_ids: torch.Tensor  # [1, N]
    attention_mask: torch.Tensor  # [1, 1, N, N] bool, True where a token may attend
    predict_at: torch.Tensor  # [T] packed positions whose logits predict a response token
    targets: torch.Tensor  # [T] those response tokens
    rows: torch.Tensor  # [T] the sample each belongs to
    cols: torch.Tensor  # [T] its index in the sample's response
    response_mask: torch.Tensor  # [B, R] float, 1 on real response tokens
    # Each sample's prompt + response tokens, samples one after another, is the sample's "flat"
    # layout (learner.trunk caches hidden states in it): where each flat token sits in the packed
    # sequence (a prefix token for every member of its cluster), and a flat token each packed
    # position holds (the cluster's first member for a prefix).
    packed_at: torch.Tensor  # [sum of prompt + response lengths]
    source: torch.Tensor  # [N]
    computed_tokens: int  # N: tokens the model computes (each prefix once)
    unshared_tokens: int  # tokens scoring every sample alone computes

    def to(self, device: torch.device | str) -> SharedPacked:
        moved = [getattr(self, f).to(device) for f in ("input_ids", "position_ids", "attention_mask", "predict_at",
                                                      "targets", "rows", "cols", "response_mask", "packed_at", "source")]
        return SharedPacked(*moved, self.computed_tokens, self.unshared_tokens)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_prefixes(prompts: Sequence[Sequence[int]], min_shared: int = MIN_SHARED) -> list[tuple[int, list[int]]]:
    """Clusters of samples and the prefix length each cluster shares: (length, members).

    Prompts are sorted, so those with long common prefixes are neighbours; a neighbour joins the
    current cluster when the tokens the cluster then saves ((members - 1) x shared length) do not
    drop. A prefix stops one token short of the shortest member's prompt: every sample keeps one
    prompt token in its segment, whose logit predicts its first response token. Length 0: alone.
    """
    order = sorted(range(len(prompts)), key=lambda i: (list(prompts[i]), i))
    clusters: list[tuple[int, list[int]]] = []
    for i in order:
        if clusters:
            length, members = clusters[-1]
            first = prompts[members[0]]
            limit = length if len(members) > 1 else len(first) - 1
            shared = min(common_prefix(first, prompts[i]), limit, len(prompts[i]) - 1)
            saved_before = (len(members) - 1) * length if len(members) > 1 else 0
            if shared >= min_shared and len(members) * shared >= saved_before:
                clusters[-1] = (shared, members + [i])
                continue
        clusters.append((0, [i]))
    return clusters


def pack_shared(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], min_shared: int = MIN_SHARED) -> SharedPacked:
    """The packed sequence of the module docstring; outputs keep the samples' order."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("pack_shared needs as many prompts as responses, and at least one")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (it predicts the first response token)")
    ids: list[int] = []
    pos: list[int] = []
    segment: list[int] = []  # one id per prefix and per sample's segment
    owner: list[int] = []  # the prefix a token may also see (its own segment's id where none)
    predict_at: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    cols: list[int] = []
    starts = [0]  # where each sample begins in the flat layout
    for p, r in zip(prompts, responses):
        starts.append(starts[-1] + len(p) + len(r))
    packed_at = [0] * starts[-1]
    source: list[int] = []
    next_segment = 0
    for length, members in plan_prefixes(prompts, min_shared):
        prefix, next_segment = next_segment, next_segment + 1
        for i in members:
            packed_at[starts[i] : starts[i] + length] = range(len(ids), len(ids) + length)
        source += range(starts[members[0]], starts[members[0]] + length)
        ids += list(prompts[members[0]][:length])
        pos += range(length)
        segment += [prefix] * length
        owner += [prefix] * length
        for i in members:
            seg, next_segment = next_segment, next_segment + 1
            tail = list(prompts[i][length:]) + list(responses[i])
            first = len(ids) + len(prompts[i]) - length - 1  # the last prompt token predicts response token 0
            packed_at[starts[i] + length : starts[i + 1]] = range(len(ids), len(ids) + len(tail))
            source += range(starts[i] + length, starts[i + 1])
            ids += tail
            pos += range(length, length + len(tail))
            segment += [seg] * len(tail)
            owner += [prefix if length else seg] * len(tail)
            predict_at += range(first, first + len(responses[i]))
            targets += list(responses[i])
            rows += [i] * len(responses[i])
            cols += range(len(responses[i]))
    seg_t, owner_t = torch.tensor(segment), torch.tensor(owner)
    n = len(ids)
    index = torch.arange(n)
    causal = index[None, :] <= index[:, None]
    visible = (seg_t[None, :] == seg_t[:, None]) | (seg_t[None, :] == owner_t[:, None])
    R = max(1, max(len(r) for r in responses))
    mask = torch.zeros(len(prompts), R)
    for b, r in enumerate(responses):
        mask[b, : len(r)] = 1.0
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return SharedPacked(
        as_long([ids]), as_long([pos]), (causal & visible)[None, None], as_long(predict_at), as_long(targets),
        as_long(rows), as_long(cols), mask, as_long(packed_at), as_long(source), n, starts[-1],
    )


def shared_logprobs(
    model: torch.nn.Module, packed: SharedPacked, with_entropy: bool = False, trunk: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, R] logprob of each response token (0 on padding), and its entropy if asked; keeps grad."""
    out = model(
        **model_input(packed.input_ids, trunk),
        attention_mask=packed.attention_mask,
        position_ids=packed.position_ids,
        logits_to_keep=packed.predict_at,
        use_cache=False,
    )
    token_logprobs, token_entropy = score_targets(out.logits[0], packed.targets, with_entropy)
    shape = packed.response_mask.shape
    where = (packed.rows, packed.cols)
    logprobs = torch.zeros(shape, dtype=token_logprobs.dtype, device=token_logprobs.device).index_put(where, token_logprobs)
    entropy = None
    if token_entropy is not None:
        entropy = torch.zeros(shape, dtype=token_entropy.dtype, device=token_entropy.device).index_put(where, token_entropy)
    return logprobs, entropy


def padded_tokens(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], min_shared: int = MIN_SHARED) -> int:
    """Tokens `pack_shared` computes: every sample's prompt and response, each prefix once."""
    clusters = plan_prefixes(prompts, min_shared)
    return sum(len(p) + len(r) for p, r in zip(prompts, responses)) - sum(length * (len(m) - 1) for length, m in clusters)
