"""`memr2 train` end to end on the tiny model, and a kill -9 mid-run that resumes to the identical
next step. Both runs use `--resume auto` (what a retried RayJob runs): the first starts fresh,
the restarted one continues."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# One training conversation (synth-0-0) of two sessions, one chunk each, and one to validate.
WORLD = ["model.name=tiny", "learner.frozen_layers=0", "learner.bf16=off", "learner.cpus_per_rank=1",
         "data.synth.conversations=2", "data.synth.sessions=2", "data.synth.val_conversations=1", "rollout.chunks_per_session=1"]
# The warm start memorises the training conversation's gold outputs: a policy that writes real
# memories, with a little sampling spread left, so some groups carry signal and steps update.
WARM = [*WORLD, "train.warmstart.synth.seed=0", "train.warmstart.synth.conversations=1", "train.warmstart.synth.sessions=2",
        "train.warmstart.synth.val_conversations=0", "train.warmstart.epochs=100", "train.warmstart.lr=3e-3",
        "train.warmstart.mini_batch=4", "train.warmstart.micro_batch=4"]
# Temperature 1: the memorised policy then still strays in some lanes, so steps carry signal.
RUN = [*WORLD, "rollout.temperature=1.0", "rollout.n_global=4", "rollout.m_local=2", "rollout.max_new_tokens=192", "rollout.num_actors=2",
       "algo.local_prob=1.0", "train.conversations_per_step=1", "train.max_steps=3", "curriculum.stages=[{horizon: 2, epochs: 3}]",
       "learner.mini_batch=8", "learner.micro_batch=4", "learner.lr=1e-5", "metrics.prometheus=false", "train.warmstart.enabled=false"]


def memr2(*args, **kw):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "memr2", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def step_rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "reward_mean" in r}


def test_kill_and_resume_reproduces_the_next_step(tmp_path):
    warm = tmp_path / "warm"
    finish(memr2("warmstart", "--out", str(warm), *WARM))
    base = [*RUN, f"model.name={warm}", f"metrics.run_dir={tmp_path}"]

    summary = json.loads(finish(memr2("train", "--resume", "auto", *base, "metrics.run_name=straight")).strip().splitlines()[-1])
    straight = step_rows(tmp_path / "straight")
    assert sorted(straight) == [1, 2, 3] and summary["steps"] == 3
    # Validation pools every question, with bootstrap intervals for each end and the paired gain.
    assert summary["val_questions"] >= 1 and len(summary["val_f1_gain_ci"]) == 2
    assert summary["val_f1_start_ci"][0] <= summary["val_f1_start"] <= summary["val_f1_start_ci"][1]
    assert "loss" in straight[3] and straight[3]["reward_mean"] > 0  # step 3 makes a real update
    assert all(straight[s]["worker_failures"] == straight[s]["tasks_retried"] == 0 and straight[s]["live_workers"] == 2 for s in straight)

    victim = memr2("train", *base, "metrics.run_name=killed")
    state = tmp_path / "killed" / "state.json"
    deadline = time.time() + 600
    while not (state.is_file() and json.loads(state.read_text())["step"] >= 2):
        assert victim.poll() is None and time.time() < deadline, "the run ended before its second step"
        time.sleep(0.5)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    finish(memr2("train", "--resume", "auto", *base, "metrics.run_name=killed"))
    resumed = step_rows(tmp_path / "killed")
    assert sorted(resumed) == [1, 2, 3]
    for key in ("reward_mean", "format_failures", "generated_tokens", "degenerate_groups", "global_groups", "local_groups", "loss", "grad_norm", "policy_version"):
        assert resumed[3].get(key) == pytest.approx(straight[3].get(key), rel=1e-6, abs=1e-9), key
    for name in ("straight", "killed"):
        out = tmp_path / name
        assert (out / "summary.json").is_file() and (out / "learning_curve.png").stat().st_size > 0
        assert (out / "policy" / "config.json").is_file()  # the final policy: `memr2 eval --policy <run>`
    assert summary["policy"] == str(tmp_path / "straight" / "policy")
