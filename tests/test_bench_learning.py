"""`memr2 bench learning`: the arms, the sample match, and one small run of both arms end to end."""

import json

import pytest

from common.config import load_config
from learner.bench_learning import arm_overrides, paired
from memr2.cli import main


def test_plain_grpo_gets_the_local_groups_expected_samples_as_global_rollouts():
    cfg = load_config()  # n = 8, m = 2, p_local = 0.5: a session's local share is one more rollout
    assert arm_overrides("logo", cfg) == []
    assert arm_overrides("grpo", cfg) == ["algo.local_prob=0", "rollout.n_global=9"]
    paper = load_config(None, ["rollout.n_global=16", "rollout.m_local=4"])
    assert arm_overrides("grpo", paper) == ["algo.local_prob=0", "rollout.n_global=18"]
    with pytest.raises(ValueError, match="unknown arm 'ppo'"):
        arm_overrides("ppo", cfg)


def test_the_arms_are_compared_seed_by_seed_with_a_t_interval():
    logo = [{"val_f1_gain": g} for g in (0.10, 0.05, 0.12)]
    grpo = [{"val_f1_gain": g} for g in (0.04, 0.07, 0.02)]
    diff = paired(logo, grpo, "val_f1_gain")  # differences 0.06, -0.02, 0.10: mean 0.0467, sd 0.0611
    assert diff["mean"] == pytest.approx(0.14 / 3) and diff["seeds"] == 3
    assert diff["se"] == pytest.approx(0.061101 / 3 ** 0.5, rel=1e-4)
    half = 4.302653 * diff["se"]  # t(0.975, df=2)
    assert diff["ci"] == pytest.approx([diff["mean"] - half, diff["mean"] + half], rel=1e-5)
    assert paired(logo[:1], grpo[:1], "val_f1_gain")["ci"] is None


@pytest.mark.slow
def test_both_arms_run_and_report_mean_and_error_over_seeds(ray_local, tmp_path, capsys):
    tiny = ["model.name=tiny", "train.warmstart.enabled=false", "learner.frozen_layers=0", "learner.bf16=off",
            "data.synth.conversations=3", "data.synth.val_conversations=1", "data.synth.sessions=1",
            "curriculum.stages=[{horizon: 1, epochs: 1}]", "rollout.n_global=2", "rollout.max_new_tokens=16",
            "train.conversations_per_step=2", "rollout.num_actors=1", "learner.cpus_per_rank=1",
            "metrics.prometheus=false", f"metrics.run_dir={tmp_path}"]
    bench = ["bench", "learning", "--arms", "logo,grpo", "--seeds", "2", "--out", str(tmp_path / "b"), "--json"]
    assert main([*bench, *tiny]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["arms"]) == {"logo", "grpo"} and result["seeds"] == 2
    assert result["arms"]["grpo"]["overrides"] == ["algo.local_prob=0", "rollout.n_global=3"]
    for arm in result["arms"].values():
        runs = arm["runs"]
        assert len(runs) == 2 and len({r["seed_run"] for r in runs}) == 2
        gains = [r["val_f1_end"] - r["val_f1_start"] for r in runs]
        assert arm["val_f1_gain_mean"] == pytest.approx(sum(gains) / 2)
        assert arm["val_f1_gain_se"] == pytest.approx(abs(gains[0] - gains[1]) / 2)  # stdev/sqrt(2) of two values
        assert arm["samples_per_step"] > 0
    gains = {arm: [r["val_f1_gain"] for r in result["arms"][arm]["runs"]] for arm in ("logo", "grpo")}
    assert result["logo_minus_grpo"]["mean"] == pytest.approx(sum(a - b for a, b in zip(gains["logo"], gains["grpo"])) / 2)
    ends = {arm: [r["val_f1_end"] for r in result["arms"][arm]["runs"]] for arm in ("logo", "grpo")}
    assert result["logo_minus_grpo_end"]["mean"] == pytest.approx(sum(a - b for a, b in zip(ends["logo"], ends["grpo"])) / 2)
    assert result["arms"]["logo"]["val_f1_end_mean"] == pytest.approx(sum(ends["logo"]) / 2)
    fails = {arm: [r["val_m_fail_end"] for r in result["arms"][arm]["runs"]] for arm in ("logo", "grpo")}
    assert result["logo_minus_grpo_m_fail"]["mean"] == pytest.approx(sum(a - b for a, b in zip(fails["logo"], fails["grpo"])) / 2)

    # Started again on the same folder, a finished bench trains nothing and reports the same runs.
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").glob("*/metrics.jsonl")}
    assert len(logs) == 4
    assert main([*bench, *tiny]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "b").glob("*/metrics.jsonl")} == logs
    assert [a["runs"] for a in again["arms"].values()] == [a["runs"] for a in result["arms"].values()]
    # With other arguments it refuses, in one line, rather than mix two benches in one folder.
    assert main(["bench", "learning", "--seeds", "3", "--out", str(tmp_path / "b"), *tiny]) == 2
    assert "holds a bench of other arguments" in capsys.readouterr().err
