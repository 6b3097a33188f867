"""The reference without its trunk (learner.trunk.drop_trunk) scores as the whole reference does,
from the policy's hidden states where their shared frozen trunk ends (TrunkTap), in fp32; and a
step's cached trunk (TrunkCache) gives the policy's and the reference's logprobs and gradients."""

import copy
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learner.engine import freeze_lower_layers
from learner.batching import Rows
from learner.trunk import TrunkCache, TrunkTap, drop_trunk, trunk_passes, upper_layers
from learner.logprobs import pack, packed_logprobs
from learner.shared_prefix import pack_shared, shared_logprobs

VOCAB, FROZEN = 300, 2


def rows(seed=0):
    """Five samples of one prompt and three of prompts sharing a prefix, ragged replies."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    chunk, instructions = tok(50), tok(30)
    prompts = [chunk] * 5 + [instructions + tok(rng.randrange(4, 20)) for _ in range(3)]
    return prompts, [tok(rng.randrange(1, 12)) for _ in prompts]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True)
    policy = LlamaForCausalLM(cfg).float()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    freeze_lower_layers(policy, FROZEN)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    with torch.no_grad():  # the policy's upper layers move, as after some updates; the trunk cannot
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    cut = copy.deepcopy(reference)
    drop_trunk(cut, FROZEN)
    return policy, reference, cut


@pytest.mark.parametrize("shared", [False, True])
def test_a_reference_without_its_trunk_scores_from_the_policys_hidden_states(models, shared):
    policy, reference, cut = models
    tap = TrunkTap(policy, FROZEN)
    prompts, responses = rows()
    packed = pack_shared(prompts, responses) if shared else pack(prompts, responses)
    score = shared_logprobs if shared else packed_logprobs

    with tap.kept():
        new, _ = score(policy, packed, with_entropy=True)  # the policy's forward, with grad
    with torch.no_grad():
        via_trunk, _ = score(cut, packed, trunk=tap.take())
        whole, _ = score(reference, packed)
    torch.testing.assert_close(via_trunk, whole, rtol=0, atol=1e-6)
    assert (via_trunk - new.detach()).abs().max() > 1e-3  # the policy's upper layers differ: not its own scores
    new.sum().backward()  # checkpointing's recompute passes the hook again, outside kept(): nothing kept

    with pytest.raises(RuntimeError, match="policy's forward first"):
        tap.take()  # taken once: a reference never reads a stale micro-batch's states


def test_the_cut_reference_holds_only_the_layers_above_the_trunk(models):
    _, reference, cut = models
    assert len(cut.get_decoder().layers) == 4 - FROZEN
    assert cut.lm_head.weight is cut.get_input_embeddings().weight  # the tied head keeps its embeddings
    per_layer = sum(p.numel() for p in reference.get_decoder().layers[0].parameters())
    assert sum(p.numel() for p in cut.parameters()) == sum(p.numel() for p in reference.parameters()) - FROZEN * per_layer


@pytest.mark.parametrize("budget", [10**6, 90])
def test_a_steps_cached_trunk_gives_the_uncached_logprobs_gradients_and_reference(models, budget):
    """TrunkCache: the trunk computed once for the shard, in passes (one, or 90 tokens each, which
    cuts a prompt's rows apart), then a micro-batch of rows from different passes run through the
    upper layers only: logprobs, entropies, gradients and the reference's logprobs are the
    uncached ones, in fp32."""
    policy, reference, cut = models
    prompts, responses = rows(seed=3)
    shard = Rows(prompts, responses, [[0.0] * len(r) for r in responses], [0.0] * len(prompts),
                 [False] * len(prompts), [("c", 1)] * len(prompts))
    passes = trunk_passes(shard, budget)
    assert sorted(i for p in passes for i in p) == list(range(len(prompts)))
    assert (len(passes) == 1) == (budget > 1000)
    cache = TrunkCache.build(policy, cut, FROZEN, shard, passes + [[]], torch.device("cpu"))  # [] : a dummy pass
    assert cache.computed_tokens < sum(len(p) + len(r) for p, r in zip(prompts, responses))

    idx = [7, 0, 3, 5, 1]  # global-group lanes of one prompt and rows of another, in no order
    packed = pack_shared([prompts[i] for i in idx], [responses[i] for i in idx])
    results = []
    for cached in (False, True):
        policy.zero_grad()
        if cached:
            with upper_layers(policy, FROZEN):
                new, entropy = shared_logprobs(policy, packed, with_entropy=True, trunk=cache.inputs(idx, packed))
            ref = cache.reference_logprobs(idx, packed.response_mask.shape[1])
        else:
            new, entropy = shared_logprobs(policy, packed, with_entropy=True)
            with torch.no_grad():
                ref, _ = shared_logprobs(reference, packed)
        (new.sum() + entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        results.append((new.detach(), entropy.detach(), ref, grads))
    assert len(policy.get_decoder().layers) == 4  # upper_layers put the trunk back
    (new0, ent0, ref0, g0), (new1, ent1, ref1, g1) = results
    torch.testing.assert_close(new1, new0, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref1, ref0, rtol=0, atol=1e-5)
    assert set(g0) == set(g1) and all(g0[n].abs().max() > 0 for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=1e-5)
