"""The DeepSpeed learner with real Ray actors, DeepSpeed and gloo on a tiny random Llama.

Rank actors ask for half a CPU each here, so a learner can start even while another test module's
actor holds a CPU of the 2-CPU test cluster; they still run one torch thread each.
"""

import math

import pyarrow as pa
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from common.config import AlgoConfig, LearnerConfig
from common.types import StepSample, samples_to_table
from learner.batching import Rows, balanced_split, plan_epoch, split_by_tokens, split_round_robin
from learner.deepspeed_learner import Learner
from learner.logprobs import response_logprobs

pytestmark = pytest.mark.slow

VOCAB = 500
CPUS = 0.5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 256}')  # copied by save_pretrained
    return str(path)


def config(**kw):
    # fp32 and every layer: the exactness checks below cannot absorb bf16's rounding. Gradient
    # checkpointing on: the exactness checks (resume, frozen layers) must hold with it.
    base = dict(num_ranks=1, zero_stage=2, lr=5e-4, mini_batch=4, micro_batch=2, ppo_epochs=2, cpus_per_rank=CPUS,
                bf16="off", frozen_layers=0, gradient_checkpointing="on")
    return LearnerConfig(**(base | kw))


@pytest.fixture(scope="module")
def learner(ray_local, model_dir):
    with Learner(model_dir, AlgoConfig(), config(), seed=1) as lrn:
        yield lrn


def tokens(g, n):
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def make_groups(lrn, seed=0):
    """A global group (4 rollouts, rollout 0 takes two steps) and a local group (3 branches).

    Behaviour logprobs come from the learner itself, so every ratio starts at 1."""
    g = torch.Generator().manual_seed(seed)
    specs = [("global", "c/s1", [(0, 1.0), (0, 1.0), (1, 0.0), (2, 1.0), (3, 0.0)]),
             ("local", "c/s1/anchor2", [(0, 0.0), (1, 1.0), (2, 0.5)])]
    tables, rewards = [], []
    for kind, gid, steps in specs:
        prompt = tokens(g, 12)
        rows = [(prompt, tokens(g, 3 + i), k, r) for i, (k, r) in enumerate(steps)]
        lp, _ = lrn.logprobs([p for p, *_ in rows], [resp for _, resp, *_ in rows])
        samples = [
            StepSample("manager", p, resp, lp[i, : len(resp)].tolist(), "c", 1, gid, kind, k, r)
            for i, (p, resp, k, r) in enumerate(rows)
        ]
        tables.append(samples_to_table(samples))
        per_rollout = dict(steps)  # one reward per rollout: the baseline is their mean, not the rows'
        baseline = sum(per_rollout.values()) / len(per_rollout)
        rewards += [r - baseline for *_, r in rows]  # the sign of each row's advantage
    return tables, rewards


def summed_logprobs(lrn, tables):
    prompts = [p for t in tables for p in t["prompt_ids"].to_pylist()]
    responses = [r for t in tables for r in t["response_ids"].to_pylist()]
    lp, _ = lrn.logprobs(prompts, responses)
    return lp.sum(-1)


def assert_finite(metrics):
    for k, v in metrics.items():
        assert math.isfinite(v), (k, v)


# ---------------------------------------------------------------- pure helpers


def test_batched_logprobs_equal_unpadded_forwards(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(3)
    prompts = [tokens(g, n) for n in (5, 17, 1, 9)]
    responses = [tokens(g, n) for n in (3, 8, 12, 0)]
    with torch.no_grad():
        lp, mask, ent = response_logprobs(model, prompts, responses, with_entropy=True)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            assert mask[b].sum() == len(r)
            if not r:
                continue
            logits = torch.log_softmax(model(torch.tensor([p + r])).logits[0].float(), -1)
            rows = logits[len(p) - 1 : len(p) - 1 + len(r)]
            want = rows.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            assert torch.allclose(lp[b, : len(r)], want, atol=1e-5)
            assert torch.allclose(ent[b, : len(r)], -(rows.exp() * rows).sum(-1), atol=1e-4)


def test_a_token_budget_cuts_micro_batches_by_padded_tokens():
    rows = Rows([[1] * n for n in (10, 3, 30, 4, 8)], [[2] * n for n in (5, 5, 50, 1, 2)],
                [[0.0] * n for n in (5, 5, 50, 1, 2)], [0.0] * 5, [False] * 5, [("c", 1)] * 5)
    micro = split_by_tokens(rows, [0, 1, 2, 3, 4], budget=32)
    assert sorted(i for m in micro for i in m) == [0, 1, 2, 3, 4]
    assert micro[0] == [2]  # 80 tokens: over the budget, alone
    for m in micro[1:]:  # rows x (longest prompt + longest response), as pack() pads them
        assert len(m) * (max(len(rows.prompts[i]) for i in m) + max(len(rows.responses[i]) for i in m)) <= 32
    assert micro[1:] == [[0, 4], [1, 3]]  # 2 x 15 and 2 x 8: longest rows first


def test_every_rank_plans_the_same_number_of_steps_and_backwards():
    g = torch.Generator().manual_seed(0)
    import pyarrow as pa

    table = pa.table({"x": list(range(11))})
    shards = split_round_robin(table, 2)
    assert [s["x"].to_pylist() for s in shards] == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
    for n in (6, 5, 1, 0):
        plan = plan_epoch(n, 2, 3, g)
        assert [len(mini) for mini in plan] == [3, 3]
        assert sorted(i for mini in plan for micro in mini for i in micro) == list(range(n))


def test_rows_with_one_prompt_are_drawn_into_mini_batches_together():
    """learner.mini_batch_by=prompt: three chunk prompts' 8 lanes each and 9 manager rows with
    their own prompts; every unit's rows lie side by side in the epoch, so a unit meets at most
    two mini-batches (one cut inside it), sizes stay equal, and each row is drawn once. Singletons
    draw exactly the row-by-row order."""
    prompts = [[1, c] for c in range(3) for _ in range(8)] + [[2, 100 + i] for i in range(9)]
    rows = Rows(prompts, [[5]] * 33, [[0.0]] * 33, [0.0] * 33, [False] * 33, [("c", 1)] * 33)
    units = rows.drawn_together("prompt")
    assert sorted(len(u) for u in units) == [1] * 9 + [8] * 3 and rows.drawn_together("row") is None
    for seed in range(5):
        plan = plan_epoch(33, 3, 2, torch.Generator().manual_seed(seed), units)
        minis = [[i for micro in mini for i in micro] for mini in plan]
        assert sorted(len(m) for m in minis) == [11, 11, 11]
        order = [i for m in minis for i in m]
        assert sorted(order) == list(range(33))
        for unit in units:
            where = sorted(order.index(i) for i in unit)
            assert where == list(range(where[0], where[0] + len(unit)))  # side by side
            assert len({k for k, m in enumerate(minis) if set(unit) & set(m)}) <= 2
    singletons = [[i] for i in range(33)]
    assert plan_epoch(33, 3, 2, torch.Generator().manual_seed(1), singletons) == plan_epoch(33, 3, 2, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="each of the 33 rows once"):
        plan_epoch(33, 3, 2, torch.Generator(), units[:-1])


def test_shared_passes_keep_a_mini_batchs_rows_and_put_one_prompts_rows_together():
    """8 rows of one chunk prompt and 8 manager rows with their own prompts, in shuffled order:
    as many passes as micro-batch slots, the same rows, the chunk's rows in one pass (cheaper
    than 4 unshared rows), and no pass costlier than an equal split's largest."""
    prompts = [[1] * 400] * 8 + [[2] * 300 + [3 + i] * 300 for i in range(8)]
    responses = [[5] * 56] * 8 + [[6] * 40] * 8
    rows = Rows(prompts, responses, [[0.0] * len(r) for r in responses], [0.0] * 16, [False] * 16, [("c", 1)] * 16)
    shuffled = [9, 0, 14, 3, 7, 12, 1, 8, 5, 15, 2, 10, 6, 11, 4, 13]
    parts = balanced_split(rows, shuffled, 4)
    assert len(parts) == 4 and sorted(i for p in parts for i in p) == list(range(16))
    assert sorted(range(8)) in [sorted(p) for p in parts]


# ---------------------------------------------------------------- Ray + DeepSpeed


def test_advantage_sign_moves_the_policy(learner):
    tables, signs = make_groups(learner)
    before = summed_logprobs(learner, tables)
    metrics = learner.train(tables)
    after = summed_logprobs(learner, tables)
    assert_finite(metrics)
    assert metrics["samples"] == 8 and metrics["steps"] == 2 * 2  # 2 epochs x ceil(8 / 4)
    assert metrics["policy_version"] == learner.version == 1
    assert metrics["lr"] == 5e-4  # the optimizer's, as the step row reports it
    for delta, sign in zip((after - before).tolist(), signs):
        if sign > 0:
            assert delta > 0
        elif sign < 0:
            assert delta < 0


def test_a_proximal_anchor_takes_the_engines_numerics_out_of_the_update(ray_local, model_dir):
    """algo.off_policy=proximal anchors the ratio on the learner's own logprobs before the update:
    rows whose behaviour logprobs differ row by row (a bf16 engine that batched them otherwise)
    give the same weights to the bit, and the one mini-batch's ratio is 1. Anchored on those
    behaviour logprobs instead, the same rows move the weights elsewhere."""
    after = {}
    for anchor, shift in (("proximal", 0.0), ("proximal", 0.1), ("behaviour", 0.1)):
        with Learner(model_dir, AlgoConfig(off_policy=anchor), config(mini_batch=8, ppo_epochs=1), seed=1) as lrn:
            tables, _ = make_groups(lrn)
            if shift:
                column = lambda t: pa.array([[v + shift * (-1) ** i for v in lp] for i, lp in enumerate(t["logprobs"].to_pylist())],  # noqa: E731
                                            t.schema.field("logprobs").type)
                tables = [t.set_column(t.schema.get_field_index("logprobs"), "logprobs", column(t)) for t in tables]
            metrics = lrn.train(tables)
            after[anchor, shift] = summed_logprobs(lrn, tables)
        if anchor == "proximal":
            assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and metrics["clip_frac"] == 0
            assert metrics["logp_mismatch"] == pytest.approx(shift, abs=1e-5)  # still measured against the engine's
    assert torch.equal(after["proximal", 0.0], after["proximal", 0.1])
    assert not torch.allclose(after["behaviour", 0.1], after["proximal", 0.1], atol=1e-4)


def test_state_dict_and_save_pretrained_round_trip(learner, tmp_path):
    tables, _ = make_groups(learner, seed=4)
    state = learner.state_dict()
    fresh = LlamaForCausalLM(LlamaConfig.from_pretrained(learner.model_dir))
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state)
    prompts = [p for t in tables for p in t["prompt_ids"].to_pylist()]
    responses = [r for t in tables for r in t["response_ids"].to_pylist()]
    with torch.no_grad():
        mine, _, _ = response_logprobs(fresh, prompts, responses)
    engine, _ = learner.logprobs(prompts, responses)
    assert torch.allclose(mine, engine, atol=1e-6)

    learner.save_pretrained(str(tmp_path / "hf"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in state.items())
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()


def test_checkpoint_resume_reproduces_the_next_step(learner, model_dir, tmp_path):
    tables, _ = make_groups(learner, seed=5)
    learner.save_checkpoint(str(tmp_path), "t1")
    saved, version = learner.state_dict(), learner.version
    next_metrics = learner.train(tables)
    next_state = learner.state_dict()

    with Learner(model_dir, AlgoConfig(), config(), seed=1) as resumed:
        resumed.load_checkpoint(str(tmp_path), "t1")
        assert resumed.version == version
        assert all(torch.equal(resumed.state_dict()[k], v) for k, v in saved.items())
        again = resumed.train(tables)
        for k in ("loss", "pg_loss", "kl", "clip_frac", "grad_norm"):
            assert again[k] == pytest.approx(next_metrics[k], rel=1e-5, abs=1e-7), k
        # equal weights after the step need the optimizer's moments restored, not only weights
        state = resumed.state_dict()
        assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in next_state.items())


def test_frozen_layers_stay_fixed_the_rest_learns_and_a_resume_reproduces_the_next_step(ray_local, model_dir, tmp_path):
    """The optimizer holds only the trained layers' state; a checkpoint must still restore it."""
    cfg = config(frozen_layers=1)
    with Learner(model_dir, AlgoConfig(), cfg, seed=1) as lrn:
        before = lrn.state_dict()
        tables, _ = make_groups(lrn, seed=8)
        assert_finite(lrn.train(tables))  # so the checkpoint carries optimizer moments
        after = lrn.state_dict()
        lrn.save_checkpoint(str(tmp_path), "t")
        expected, expected_state = lrn.train(tables), lrn.state_dict()
    frozen = [k for k in before if k.startswith(("model.embed_tokens.", "model.layers.0."))]
    trained = [k for k in before if k.startswith("model.layers.1.")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)

    with Learner(model_dir, AlgoConfig(), cfg, seed=1) as resumed:
        resumed.load_checkpoint(str(tmp_path), "t")
        again = resumed.train(tables)
        state = resumed.state_dict()
    for k in ("loss", "pg_loss", "grad_norm"):
        assert again[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-7), k
    assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in expected_state.items())


def test_freezing_every_layer_is_refused(ray_local, model_dir):
    with pytest.raises(Exception, match="leaves nothing to train"):
        Learner(model_dir, AlgoConfig(), config(frozen_layers=2), seed=1)


def test_going_back_to_a_checkpoint_publishes_a_new_version(learner, tmp_path):
    """A stage that restarts from its best checkpoint gets that checkpoint's weights under a newer
    version (the policy store refuses older ones), and the shuffle counter runs on."""
    tables, _ = make_groups(learner, seed=6)
    learner.save_checkpoint(str(tmp_path), "best")
    best = learner.state_dict()
    learner.train(tables)
    version, calls = learner.version, learner.train_calls
    learner.load_checkpoint(str(tmp_path), "best", as_new_version=True)
    assert (learner.version, learner.train_calls) == (version + 1, calls)
    assert all(torch.equal(learner.state_dict()[k], v) for k, v in best.items())


@pytest.mark.parametrize("budget,frozen", [(None, 0), (32, 1)])
def test_two_ranks_agree_and_match_one_rank(ray_local, model_dir, budget, frozen):
    """One mini-batch split over 2 ZeRO-2 ranks gives the same update as one ZeRO-3 rank.

    The ranks' shards mix global and local rows in different proportions, so with a local weight
    only pooling over the whole mini-batch (counts all-reduced) can match; 6 micro-batch slots
    for 4 rows per rank also run the zero-weight dummy backward. The two ranks recompute their
    activations (gradient checkpointing) and share a ZeRO-3-sharded reference; with a budget of
    32 tokens their rows are cut by tokens instead of by count (15-19 tokens a row: two short
    rows share a pass, a longer one goes alone, so the ranks cut their shards into different
    numbers of passes and the shorter pads with dummies), and the one rank keeps everything. With
    a frozen layer the references, sharded and whole, read the policy's trunk (learner.trunk.drop_trunk),
    dummy passes included."""
    algo = AlgoConfig(local_weight=0.3)
    cfg2 = config(num_ranks=2, zero_stage=2, mini_batch=12, micro_batch=1, ppo_epochs=1, reference="sharded",
                  max_tokens_per_micro_batch=budget, frozen_layers=frozen)
    with Learner(model_dir, algo, cfg2) as two:
        placed = ray.util.placement_group_table(two.group)  # one group, packed onto one node
        assert placed["strategy"] == "PACK" and len(set(placed["bundles_to_node_id"].values())) == 1
        tables, _ = make_groups(two, seed=7)
        m2 = two.train(tables)
        rank0, rank1 = two.rank_state_dicts()
        probe = summed_logprobs(two, tables)
    assert_finite(m2)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    cfg1 = config(num_ranks=1, zero_stage=3, mini_batch=8, micro_batch=4, ppo_epochs=1, gradient_checkpointing="off",
                  frozen_layers=frozen)
    with Learner(model_dir, algo, cfg1) as one:
        m1 = one.train(tables)
        one_state = one.state_dict()
        assert torch.allclose(summed_logprobs(one, tables), probe, atol=1e-4)
    assert set(one_state) == set(rank0) and all(one_state[k].shape == rank0[k].shape for k in rank0)
    for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "samples", "tokens"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("frozen", [0, 1])
def test_shared_prefixes_give_the_same_update_and_count_the_tokens_they_save(ray_local, model_dir, frozen):
    """Both sample kinds, ragged responses, 8 rows on one 40-token chunk prompt (a global group's
    lanes and a local group's branches): one update with learner.shared_prefix on and off lands
    on the same weights (fp32), computing fewer tokens. With a frozen layer the shared update
    reads the step's cached trunk and reference (learner.trunk.TrunkCache), computing its tokens
    once. The behaviour logprobs are the learner's own, so the mismatch it logs is ~0."""
    g = torch.Generator().manual_seed(11)
    chunk = tokens(g, 40)
    samples = []
    for kind, gid, n in (("global", "c/s1", 5), ("local", "c/s1/anchor0", 3)):
        rows = [(chunk, tokens(g, 2 + 3 * i)) for i in range(n)] + [(tokens(g, 30), tokens(g, 4))]
        samples += [(kind, gid, i, p, r) for i, (p, r) in enumerate(rows)]
    results = {}
    for shared in ("off", "on"):
        with Learner(model_dir, AlgoConfig(), config(gradient_checkpointing="off", shared_prefix=shared, mini_batch=8,
                                                     micro_batch=4, ppo_epochs=1, frozen_layers=frozen)) as lrn:
            lp, _ = lrn.logprobs([s[3] for s in samples], [s[4] for s in samples])
            tables = [samples_to_table([StepSample("extractor", p, r, lp[j, : len(r)].tolist(), "c", 1, gid, kind, i, float(i % 3))
                                        for j, (kind, gid, i, p, r) in enumerate(samples) if gid == group])
                      for group in ("c/s1", "c/s1/anchor0")]
            metrics = lrn.train(tables)
            results[shared] = (metrics, summed_logprobs(lrn, tables))
    (off, off_after), (on, on_after) = results["off"], results["on"]
    assert off["prefix_token_ratio"] == off["trunk_token_ratio"] == 1.0 and on["prefix_token_ratio"] < 0.6
    # Cached, the trunk packs the shard's 10 rows by prompt once; else it runs in the 2 passes.
    assert (on["trunk_token_ratio"] < on["prefix_token_ratio"]) == (frozen > 0)
    for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
        assert on[k] == pytest.approx(off[k], rel=1e-4, abs=1e-6), k
    # Adam's first step is ~lr * sign(g): compare what the weights do, not their last bits.
    assert torch.allclose(on_after, off_after, atol=1e-4)
    assert on["logp_mismatch"] < 1e-4 and abs(on["logp_mismatch_kl"]) < 1e-6
