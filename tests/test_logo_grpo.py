"""LoGo-GRPO's equations against an independent float64 reference written with plain loops and math.

The reference below re-derives DESIGN §3 from scratch (it never calls learner.logo_grpo), so a
shared misreading would have to be made twice to pass.
"""

import math

import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import AlgoConfig
from common.types import StepSample, samples_to_table
from learner.logo_grpo import group_advantages, logo_grpo_loss, pool_weights, with_advantages

# ---------------------------------------------------------------- independent reference


def ref_sample(new, old, mask, adv, cfg, ref=None, ent=None):
    """One sample's objective terms and which branch of the clipped objective it took."""
    n_tok = sum(mask)
    log_ratio = sum((a - b) * m for a, b, m in zip(new, old, mask)) / max(n_tok, 1)
    capped = log_ratio > cfg.log_ratio_cap
    rho = math.exp(min(log_ratio, cfg.log_ratio_cap))
    unclipped = rho * adv
    clipped = min(max(rho, 1 - cfg.clip_eps), 1 + cfg.clip_eps) * adv
    pg = min(unclipped, clipped)
    branch = "clip" if clipped < unclipped else "plain"
    if adv < 0 and cfg.dual_clip * adv > pg:
        pg, branch = cfg.dual_clip * adv, "dual"
    kl = 0.0
    if ref is not None and cfg.kl_beta > 0:
        kl = sum((math.exp(r - a) - (r - a) - 1) * m for a, r, m in zip(new, ref, mask)) / max(n_tok, 1)
    entropy = sum(e * m for e, m in zip(ent, mask)) / max(n_tok, 1) if ent is not None else 0.0
    return {"pg": pg, "kl": kl, "ent": entropy, "rho": rho, "branch": branch, "capped": capped}


def ref_weights(is_local, local_weight):
    ng = sum(1 for x in is_local if not x)
    nl = sum(1 for x in is_local if x)
    if local_weight is None:
        return [1 / (ng + nl)] * len(is_local)
    if ng == 0:
        return [1 / nl] * len(is_local)
    if nl == 0:
        return [1 / ng] * len(is_local)
    return [local_weight / nl if x else (1 - local_weight) / ng for x in is_local]


def ref_loss(new, old, mask, adv, is_local, cfg, ref=None, ent=None):
    rows = [
        ref_sample(new[i], old[i], mask[i], adv[i], cfg, ref[i] if ref else None, ent[i] if ent else None)
        for i in range(len(new))
    ]
    w = ref_weights(is_local, cfg.local_weight)
    obj = [r["pg"] - cfg.kl_beta * r["kl"] + cfg.entropy_eta * r["ent"] for r in rows]
    loss = -sum(wi * o for wi, o in zip(w, obj))
    return loss, rows, w


# ---------------------------------------------------------------- inputs

# Per-sample mean log-ratio offsets chosen to land in every branch: far below 1-eps, inside the
# trust region, above 1+eps, beyond the dual clip c=3 (log 3 = 1.1), and beyond the cap of 3.
OFFSETS = [-1.0, -0.05, 0.0, 0.05, 0.5, 1.6, 5.0, -0.6, 0.3, 2.0, 4.0, -2.0]
ADV_SIGNS = [1, -1, 1, -1, 1, -1, 1, -1, -1, 1, -1, 1]


def make_batch(seed=0, L=7):
    g = torch.Generator().manual_seed(seed)
    B = len(OFFSETS)
    old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 4
    noise = torch.randn(B, L, generator=g, dtype=torch.float64) * 0.1
    new = old + torch.tensor(OFFSETS, dtype=torch.float64)[:, None] + noise
    lengths = [1 + (i * 3) % L for i in range(B)]  # 1..L, different per row
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(L)] for n in lengths], dtype=torch.float64)
    adv = torch.tensor(ADV_SIGNS, dtype=torch.float64) * (0.2 + torch.rand(B, generator=g, dtype=torch.float64))
    is_local = torch.tensor([i % 3 == 0 for i in range(B)])
    ref = new.detach() + torch.randn(B, L, generator=g, dtype=torch.float64) * 0.3
    ent = torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    return new, old, mask, adv, is_local, ref, ent


def as_lists(*tensors):
    return [t.tolist() for t in tensors]


CONFIGS = [
    AlgoConfig(local_weight=None, kl_beta=0.0, entropy_eta=0.0),
    AlgoConfig(local_weight=None, kl_beta=0.05, entropy_eta=0.01),
    AlgoConfig(local_weight=0.3, kl_beta=0.0, entropy_eta=0.01),
    AlgoConfig(local_weight=0.7, kl_beta=0.05, entropy_eta=0.0),
    AlgoConfig(),  # the paper's defaults
]


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"w{c.local_weight}-b{c.kl_beta}-e{c.entropy_eta}")
def test_loss_and_metrics_match_the_reference(cfg):
    new, old, mask, adv, is_local, ref, ent = make_batch()
    loss, m = logo_grpo_loss(new, old, mask, adv, is_local, cfg, ref_logprobs=ref, entropy=ent)
    want, rows, w = ref_loss(*as_lists(new, old, mask, adv, is_local), cfg, ref=ref.tolist(), ent=ent.tolist())
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert m["pg_loss"] == pytest.approx(-sum(wi * r["pg"] for wi, r in zip(w, rows)), abs=1e-12)
    assert m["kl"] == pytest.approx(sum(wi * r["kl"] for wi, r in zip(w, rows)), abs=1e-12)
    assert m["entropy"] == pytest.approx(sum(wi * r["ent"] for wi, r in zip(w, rows)), abs=1e-12)
    assert m["ratio_mean"] == pytest.approx(sum(r["rho"] for r in rows) / len(rows), rel=1e-12)
    n_cut = sum(r["branch"] != "plain" for r in rows)
    assert m["clip_frac"] == pytest.approx(n_cut / len(rows))
    assert m["dual_clip_frac"] == pytest.approx(sum(r["branch"] == "dual" for r in rows) / len(rows))
    assert m["cap_frac"] == pytest.approx(sum(r["capped"] for r in rows) / len(rows))
    assert (m["n_global"], m["n_local"]) == (8, 4)
    assert loss.item() == pytest.approx(m["pg_loss"] + cfg.kl_beta * m["kl"] - cfg.entropy_eta * m["entropy"])


def test_the_inputs_exercise_every_branch():
    new, old, mask, adv, is_local, ref, ent = make_batch()
    _, rows, _ = ref_loss(*as_lists(new, old, mask, adv, is_local), AlgoConfig())
    signs = [(r["branch"], a > 0) for r, a in zip(rows, adv.tolist())]
    assert ("plain", True) in signs and ("plain", False) in signs
    assert ("clip", True) in signs  # rho > 1+eps with A > 0
    assert ("clip", False) in signs  # rho < 1-eps with A < 0
    assert ("dual", False) in signs  # rho > c with A < 0
    assert sum(r["capped"] for r in rows) >= 2
    # one capped sample has A > 0 (clipped at 1+eps) and one A < 0 (dual clip)
    assert {a > 0 for r, a in zip(rows, adv.tolist()) if r["capped"]} == {True, False}


def test_kl_is_skipped_without_reference_or_beta():
    new, old, mask, adv, is_local, ref, ent = make_batch()
    cfg = AlgoConfig(kl_beta=0.5)
    no_ref, m = logo_grpo_loss(new, old, mask, adv, is_local, cfg)
    zero_beta, _ = logo_grpo_loss(new, old, mask, adv, is_local, AlgoConfig(kl_beta=0.0), ref_logprobs=ref)
    with_ref, m_ref = logo_grpo_loss(new, old, mask, adv, is_local, cfg, ref_logprobs=ref)
    assert m["kl"] == 0.0 and m_ref["kl"] > 0
    assert no_ref.item() == pytest.approx(zero_beta.item())
    assert with_ref.item() == pytest.approx(no_ref.item() + 0.5 * m_ref["kl"])


@pytest.mark.parametrize("cfg", CONFIGS[1:4], ids=["mean", "w0.3", "w0.7"])
def test_gradient_matches_finite_differences_of_the_reference(cfg):
    new, old, mask, adv, is_local, ref, ent = make_batch(seed=1)
    new = new.clone().requires_grad_(True)
    ent = ent.clone().requires_grad_(True)
    loss, _ = logo_grpo_loss(new, old, mask, adv, is_local, cfg, ref_logprobs=ref, entropy=ent)
    loss.backward()
    base = as_lists(old, mask, adv, is_local)
    new_l, ent_l, ref_l, h = new.tolist(), ent.tolist(), ref.tolist(), 1e-6

    def f(nl, el):
        return ref_loss(nl, *base, cfg, ref=ref_l, ent=el)[0]

    for i in range(len(new_l)):
        for t in range(len(new_l[0])):
            for which, grad in (("new", new.grad), ("ent", ent.grad)):
                hi = [row[:] for row in (new_l if which == "new" else ent_l)]
                lo = [row[:] for row in hi]
                hi[i][t] += h
                lo[i][t] -= h
                fd = (f(hi, ent_l) - f(lo, ent_l)) if which == "new" else (f(new_l, hi) - f(new_l, lo))
                assert grad[i, t].item() == pytest.approx(fd / (2 * h), abs=1e-7), (which, i, t)
    assert torch.all(new.grad[mask == 0] == 0)


def test_a_small_step_against_the_gradient_lowers_the_loss():
    new, old, mask, adv, is_local, ref, ent = make_batch(seed=2)
    cfg = AlgoConfig(kl_beta=0.05, entropy_eta=0.01)
    new = new.clone().requires_grad_(True)
    loss, _ = logo_grpo_loss(new, old, mask, adv, is_local, cfg, ref_logprobs=ref, entropy=ent)
    loss.backward()
    assert new.grad.abs().sum() > 0
    stepped, _ = logo_grpo_loss(new.detach() - 1e-3 * new.grad, old, mask, adv, is_local, cfg, ref, ent)
    assert stepped.item() < loss.item()
    # and the policy-gradient part moves each unclipped sample's ratio toward its advantage's sign
    g = (new.grad * mask).sum(-1)
    _, rows, _ = ref_loss(*as_lists(new.detach(), old, mask, adv, is_local), AlgoConfig(kl_beta=0, entropy_eta=0))
    for gi, r, a in zip(g.tolist(), rows, adv.tolist()):
        if r["branch"] == "plain" and not r["capped"]:
            assert gi * a < 0  # loss falls as logp_new rises for A > 0, falls as it drops for A < 0


def test_microbatch_shares_add_up_to_the_pooled_loss():
    new, old, mask, adv, is_local, ref, ent = make_batch()
    for lw in (None, 0.3):
        cfg = AlgoConfig(local_weight=lw)
        whole, _ = logo_grpo_loss(new, old, mask, adv, is_local, cfg, ref, ent)
        ng, nl = int((~is_local).sum()), int(is_local.sum())
        parts = 0.0
        for sl in (slice(0, 5), slice(5, 12)):
            w = pool_weights(is_local[sl], lw, n_global=ng, n_local=nl)
            part, _ = logo_grpo_loss(new[sl], old[sl], mask[sl], adv[sl], is_local[sl], cfg, ref[sl], ent[sl], w)
            parts += part.item()
        assert parts == pytest.approx(whole.item(), rel=1e-12)


def test_an_absent_kind_hands_its_weight_to_the_other():
    only_global = torch.zeros(4, dtype=torch.bool)
    only_local = torch.ones(3, dtype=torch.bool)
    assert pool_weights(only_global, 0.3).tolist() == [0.25] * 4
    assert pool_weights(only_local, 0.3).tolist() == pytest.approx([1 / 3] * 3)
    mixed = torch.tensor([False, False, True])
    assert pool_weights(mixed, 0.3).tolist() == pytest.approx([0.35, 0.35, 0.3])
    assert pool_weights(mixed, None).tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="local_weight"):
        pool_weights(mixed, 1.5)


def test_empty_responses_count_as_ratio_one_not_nan():
    z = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = logo_grpo_loss(z + 1, z, z, adv, torch.tensor([False, True]), AlgoConfig(), z, z)
    assert math.isfinite(loss.item()) and m["ratio_mean"] == 1.0


# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    # mean 0.5, deviations +-0.5, population std 0.5
    assert group_advantages([1.0, 0.0], 1e-6) == pytest.approx([0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)])
    s = math.sqrt(2 / 3)  # population std of 1, 2, 3
    assert group_advantages([1.0, 2.0, 3.0], 1e-6) == pytest.approx([-1 / (s + 1e-6), 0.0, 1 / (s + 1e-6)])
    assert group_advantages([0.4, 0.4, 0.4, 0.4], 1e-6) == [0.0] * 4
    assert group_advantages([], 1e-6) == []


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=16))
def test_group_advantages_are_centred_and_unit_scaled(rewards):
    adv = group_advantages(rewards, 1e-6)
    assert sum(adv) == pytest.approx(0.0, abs=1e-6)
    spread = math.sqrt(sum(a * a for a in adv) / len(adv))
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    assert spread == pytest.approx(std / (std + 1e-6), abs=1e-9)


def step(rollout, reward, kind="global", group="c1/s1"):
    # An oracle score, not the NaN of a conversation without gold: tables compare equal only without NaN.
    return StepSample("extractor", [1], [2], [-0.5], "c1", 1, group, kind, rollout, reward, chunk=0, oracle=0.5)


def test_with_advantages_z_scores_rollouts_not_rows():
    # rollout 0 took three steps, rollout 1 one step: a row-level mean would be 0.75, not 0.5.
    table = samples_to_table([step(0, 1.0), step(0, 1.0), step(1, 0.0), step(0, 1.0)])
    out = with_advantages(table, 1e-6)
    a = 0.5 / (0.5 + 1e-6)  # rewards (1, 0) per rollout: mean 0.5, std 0.5
    assert out["advantage"].to_pylist() == pytest.approx([a, a, -a, a])
    assert out.schema.equals(table.schema)
    assert out.drop_columns(["advantage"]).equals(table.drop_columns(["advantage"]))


def test_with_advantages_equal_rewards_give_zeros():
    table = samples_to_table([step(k % 3, 0.25, kind="local") for k in range(7)])
    assert with_advantages(table, 1e-6)["advantage"].to_pylist() == [0.0] * 7


def test_with_advantages_rejects_mixed_groups_and_inconsistent_rewards():
    with pytest.raises(ValueError, match="group_id"):
        with_advantages(samples_to_table([step(0, 1.0), step(1, 0.0, group="c1/s2")]), 1e-6)
    with pytest.raises(ValueError, match="more than one reward"):
        with_advantages(samples_to_table([step(0, 1.0), step(0, 0.0), step(1, 0.0)]), 1e-6)
    empty = pa.Table.from_pylist([], schema=samples_to_table([step(0, 1.0)]).schema)
    assert with_advantages(empty, 1e-6).num_rows == 0
