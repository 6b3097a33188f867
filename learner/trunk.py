"""The policy's frozen trunk (learner.frozen_layers): its embeddings and first n decoder layers.

They never change, so the hidden states where the trunk ends depend on the tokens alone:

- the reference shares them: it keeps only the layers above (drop_trunk) and reads the policy's
  trunk output, from each pass's forward (TrunkTap) or from the step's cache;
- with shared prompts (learner.shared_prefix) they are computed once per step (TrunkCache):
  rows in session and prompt order, packed so that every row of a prompt shares one computation
  of it, not only the rows a random mini-batch happens to hold together; each optimizer step's
  passes then run the layers above the trunk only (upper_layers), and the reference's logprobs,
  which depend on the trunk and frozen weights alone, come from the same passes. Every token sees
  the tokens and positions it sees alone, so logprobs and gradients are the uncached ones up to
  floating point (tests/test_trunk.py, `memr2 bench learner`'s max_grad_diff).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from learner.batching import Rows, split_by_tokens
from learner.shared_prefix import SharedPacked, pack_shared, shared_logprobs

# Tokens per trunk pass. Its attention mask is dense (N^2): on the embedded default's rows
# (SmolLM2, 2 CPU cores) 640-1024 tokens cost ~4.7 s for the step's trunk, 1536 5.3-6.7 s and
# one 5.2k-token pass 15 s, while 1024 packs every 8-10-lane chunk prompt into one pass.
TRUNK_PASS_TOKENS = 1024


def drop_trunk(ref: torch.nn.Module, n: int) -> None:
    """The reference's first n layers, and the embeddings under them, are the policy's frozen trunk
    (learner.engine.freeze_lower_layers): the same weights fed the same tokens, so the same hidden
    states. The reference keeps only the layers above and reads those hidden states from the
    policy, which computed them anyway: at SmolLM2's 20 of 30 frozen layers its forward costs a
    third, and it holds a third of the layers. The embeddings stay: a tied LM head reads them."""
    if n > 0:
        decoder = ref.get_decoder()
        decoder.layers = decoder.layers[n:]


class TrunkTap:
    """The policy's hidden states entering layer n, the output of its frozen trunk, kept from a
    forward run under `kept()`: the reference's input (drop_trunk). A forward pre-hook, so it works
    under ZeRO-3; other forwards, and gradient checkpointing's recompute in the backward, keep nothing."""

    def __init__(self, policy: torch.nn.Module, n: int) -> None:
        self.hidden: torch.Tensor | None = None
        self._armed = False
        policy.get_decoder().layers[n].register_forward_pre_hook(self._keep)

    @contextmanager
    def kept(self) -> Iterator[None]:
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _keep(self, _module: torch.nn.Module, args: tuple) -> None:
        if self._armed:
            self.hidden = args[0].detach()

    def take(self) -> torch.Tensor:
        hidden, self.hidden = self.hidden, None  # freed with the micro-batch
        if hidden is None:
            raise RuntimeError("the reference needs the policy's forward first (TrunkTap)")
        return hidden


@contextmanager
def upper_layers(model: torch.nn.Module, n: int) -> Iterator[None]:
    """For the forwards inside: the model's layers from n up only, so fed the trunk's hidden states
    as inputs_embeds it computes what the whole model computes from the tokens. The backward
    needs no context: autograd holds the layers it ran."""
    decoder = model.get_decoder()
    layers = decoder.layers
    decoder.layers = layers[n:]
    try:
        yield
    finally:
        decoder.layers = layers


def trunk_states(model: torch.nn.Module, n: int, packed: SharedPacked) -> torch.Tensor:
    """[N, H] hidden states entering layer n for a packed sequence, without gradient: the decoder
    with its first n layers and no final norm."""
    decoder = model.get_decoder()
    layers, norm = decoder.layers, decoder.norm
    decoder.layers, decoder.norm = layers[:n], torch.nn.Identity()
    try:
        with torch.no_grad():
            out = decoder(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                          position_ids=packed.position_ids, use_cache=False)
        return out.last_hidden_state[0]
    finally:
        decoder.layers, decoder.norm = layers, norm


def trunk_passes(rows: Rows, budget: int = TRUNK_PASS_TOKENS) -> list[list[int]]:
    """The shard's rows in session and prompt order, cut into packed passes of at most `budget`
    tokens (a longer row alone), so a prompt's rows share a pass."""
    order = sorted(range(len(rows)), key=lambda i: (rows.sessions[i], rows.prompts[i], i))
    return split_by_tokens(rows, order, budget, shared=True)


@dataclass(slots=True)
class TrunkCache:
    """One step's trunk output per row ([prompt + response tokens, H], in the row's flat layout:
    SharedPacked.packed_at) and the reference's logprobs per row ([response tokens]; None
    without a reference)."""

    hidden: list[torch.Tensor]
    reference: list[torch.Tensor] | None
    computed_tokens: int  # tokens the trunk computed for the step
    zero: torch.Tensor  # [H] in the trunk output's dtype, on its device

    @classmethod
    def build(cls, policy: torch.nn.Module, ref: torch.nn.Module | None, n: int, rows: Rows,
              passes: list[list[int]], device: torch.device) -> TrunkCache:
        """`passes` (trunk_passes) cover every row once; an empty one runs a one-token forward, so
        a reference sharded over ranks (ZeRO-3) joins as many gathers on every rank."""
        hidden: list[torch.Tensor | None] = [None] * len(rows)
        reference: list[torch.Tensor | None] | None = None if ref is None else [None] * len(rows)
        computed = 0
        for idx in passes:
            sub = rows.select(idx) if idx else Rows([[0]], [[0]], [[0.0]], [0.0], [False], [("", 0)])
            packed = pack_shared(sub.prompts, sub.responses).to(device)
            states = trunk_states(policy, n, packed)
            flat = states[packed.packed_at].split([len(p) + len(r) for p, r in zip(sub.prompts, sub.responses)])
            if ref is not None:
                with torch.no_grad():
                    ref_lp, _ = shared_logprobs(ref, packed, trunk=states[None])
            for b, i in enumerate(idx):
                hidden[i] = flat[b]
                if reference is not None:
                    reference[i] = ref_lp[b, : len(rows.responses[i])]
            computed += packed.computed_tokens if idx else 0
        if any(h is None for h in hidden):
            raise ValueError("TrunkCache.build: the passes must cover every row")
        embeddings = policy.get_input_embeddings().weight  # under ZeRO-3 a shard, of the right dtype
        return cls(hidden, reference, computed, torch.zeros(policy.config.hidden_size, dtype=embeddings.dtype, device=device))

    def blank(self, tokens: int) -> torch.Tensor:
        """[1, tokens, H] zeros: a dummy pass's trunk output (finite through the layers above)."""
        return self.zero.expand(1, tokens, -1)

    def inputs(self, idx: list[int], packed: SharedPacked) -> torch.Tensor:
        """[1, N, H]: the trunk output at each position of rows `idx` packed together."""
        return torch.cat([self.hidden[i] for i in idx])[packed.source][None]

    def reference_logprobs(self, idx: list[int], width: int) -> torch.Tensor | None:
        """[B, width] the reference's logprobs of rows `idx`, right-padded with 0."""
        if self.reference is None:
            return None
        out = torch.zeros(len(idx), width, dtype=self.reference[idx[0]].dtype, device=self.reference[idx[0]].device)
        for b, i in enumerate(idx):
            out[b, : len(self.reference[i])] = self.reference[i]
        return out
