"""Shared-prompt training (learner.shared_prefix) computes the same loss and gradients as scoring
every sample alone, in fp32, on the tiny model; and the off-policy pieces of the loss."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.config import AlgoConfig
from learner.logo_grpo import logo_grpo_loss, mismatch, pool_weights
from learner.logprobs import pack, packed_logprobs
from learner.shared_prefix import pack_shared, padded_tokens, plan_prefixes, shared_logprobs

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).float().train()


def batch(seed=0):
    """Extractor rows of one chunk prompt (n lanes + local branches), manager rows whose prompts
    share a long instruction prefix and differ after it, and one unrelated short prompt."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    chunk, instructions = tok(60), tok(40)
    prompts = [chunk] * 5 + [instructions + tok(rng.randrange(5, 30)) for _ in range(4)] + [tok(3)]
    responses = [tok(rng.randrange(1, 12)) for _ in prompts]
    is_local = torch.tensor([False, False, False, True, True, False, True, False, True, False])
    return prompts, responses, is_local


def loss_and_grads(model, prompts, responses, is_local, shared):
    model.zero_grad()
    packed = pack_shared(prompts, responses) if shared else pack(prompts, responses)
    new, entropy = (shared_logprobs if shared else packed_logprobs)(model, packed, with_entropy=True)
    mask = packed.response_mask
    g = torch.Generator().manual_seed(1)
    old = (new.detach() + 0.05 * torch.randn(new.shape, generator=g)) * mask
    adv = torch.randn(len(prompts), generator=g)
    loss, _ = logo_grpo_loss(new, old, mask, adv, is_local, AlgoConfig(entropy_eta=0.01), entropy=entropy,
                             weights=pool_weights(is_local, 0.5))
    loss.backward()
    return new.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_shared_prefixes_give_the_same_logprobs_loss_and_gradients(model):
    prompts, responses, is_local = batch()
    lp_a, loss_a, grads_a = loss_and_grads(model, prompts, responses, is_local, shared=False)
    lp_b, loss_b, grads_b = loss_and_grads(model, prompts, responses, is_local, shared=True)
    assert torch.allclose(lp_a, lp_b, atol=1e-5)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    scale = max(g.abs().max() for g in grads_a.values())
    for name, g in grads_a.items():
        assert torch.allclose(g, grads_b[name], atol=1e-5 * scale, rtol=1e-4), name


def test_prefixes_are_planned_where_they_save_tokens():
    prompts, responses, _ = batch()
    clusters = plan_prefixes(prompts)
    by_member = {i: length for length, members in clusters for i in members}
    assert {by_member[i] for i in range(5)} == {59}  # one chunk prompt: all but its last token shared
    assert {by_member[i] for i in range(5, 9)} == {40}  # the instructions
    assert by_member[9] == 0  # alone
    packed = pack_shared(prompts, responses)
    unshared = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    assert packed.unshared_tokens == unshared
    assert packed.computed_tokens == unshared - 4 * 59 - 3 * 40
    assert padded_tokens(prompts, responses) == packed.input_ids.numel() == packed.computed_tokens  # no padding
    # A prefix attends to itself; a sample to its prefix and itself; nothing sees another sample.
    mask = packed.attention_mask[0, 0]
    assert mask.sum(-1).min() >= 1 and torch.equal(mask, mask.tril())
    assert plan_prefixes([[1, 2, 3]] * 3, min_shared=16) == [(0, [0]), (0, [1]), (0, [2])]  # too short to share


def test_decoupled_objective_reduces_to_ppo_on_policy_and_truncates_the_behaviour_weight():
    g = torch.Generator().manual_seed(0)
    new = torch.randn(4, 6, generator=g, requires_grad=True)
    old = new.detach() + 0.1 * torch.randn(4, 6, generator=g)
    mask, adv, is_local = torch.ones(4, 6), torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.tensor([False, True, False, True])
    cfg = AlgoConfig(off_policy="decoupled", tis_cap=1.5, kl_beta=0, entropy_eta=0)
    ppo, _ = logo_grpo_loss(new, old, mask, adv, is_local, cfg)
    same, m = logo_grpo_loss(new, old, mask, adv, is_local, cfg, prox_logprobs=old)  # prox = behaviour
    assert torch.allclose(ppo, same) and m["tis_weight_mean"] == pytest.approx(1.0)
    prox = old + 1.0  # pi_prox / pi_behav = e > tis_cap
    _, m = logo_grpo_loss(new, old, mask, adv, is_local, cfg, prox_logprobs=prox)
    assert m["tis_weight_mean"] == pytest.approx(1.5)


def test_mismatch_is_zero_for_equal_logprobs_and_k3_otherwise():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    a = torch.tensor([[-1.0, -2.0, -9.0]])
    assert mismatch(a, a, mask) == (0.0, 0.0, 2.0)
    abs_sum, k3, n = mismatch(a + 0.1, a, mask)
    assert abs_sum == pytest.approx(0.2) and k3 == pytest.approx(2 * (torch.exp(torch.tensor(0.1)) - 1.1).item())
