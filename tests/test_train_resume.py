"""`memr2 train` end to end on the tiny model over a two-stage curriculum, checkpointing every
second step: a run stopped by train.max_steps and a run killed -9 mid-run both resume to the
identical next steps. Both runs use `--resume auto` (what a retried RayJob runs): the first start
is fresh, the restart continues."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_world import WORLD, finish, memr2

pytestmark = pytest.mark.slow

# Temperature 1: the memorised policy then still strays in some lanes, so steps carry signal.
# One step an epoch, each validated; stage 1 (steps 3-4) starts from stage 0's best weights.
RUN = [*WORLD, "rollout.temperature=1.0", "rollout.n_global=4", "rollout.m_local=2", "rollout.max_new_tokens=192", "rollout.num_actors=2",
       "algo.local_prob=1.0", "train.conversations_per_step=1", "curriculum.stages=[{horizon: 2, epochs: 2}, {horizon: 2, epochs: 2}]",
       "train.checkpoint_every=2", "train.keep_checkpoints=1",
       "learner.mini_batch=8", "learner.micro_batch=4", "learner.lr=1e-5", "metrics.prometheus=false", "train.warmstart.enabled=false",
       # Batches independent of timing: a fresh engine's logprobs then equal a long-lived one's.
       "rollout.deterministic=true", "rollout.tasks_per_worker=1"]


def step_rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "reward_mean" in r]
    assert len(steps) == len(set(steps)), steps  # a resume repeats the steps after its checkpoint, once
    return {r["step"]: r for r in rows if "reward_mean" in r}


def saved(run: Path) -> tuple[int, list[str], list[str]]:
    """The state's step, the step checkpoints and the best folders on disk."""
    step = json.loads((run / "state.json").read_text())["step"]
    return step, sorted(p.name for p in (run / "checkpoints").glob("step*")), sorted(p.name for p in run.glob("best-*"))


@pytest.mark.parametrize("staleness", [0, 1])
def test_stopped_and_killed_runs_resume_to_the_identical_next_steps(tmp_path, warm_tiny, staleness):
    """With train.max_staleness=1 step 1 runs step 2's rollouts ahead (same stage), step 3 step
    4's: the stopped run's last checkpoint (step 3) keeps them, the killed run's (step 2) has none
    to keep, and both must still reach the steps of an unbroken run."""
    warm = warm_tiny
    base = [*RUN, f"model.name={warm}", f"metrics.run_dir={tmp_path}", f"train.max_staleness={staleness}"]

    # Stopped by max_steps after step 3: checkpointed there, though 3 is no multiple of 2; with
    # keep_checkpoints=1 step 2's is gone. Then resumed to the end, step 4.
    finish(memr2("train", "--resume", "auto", *base, "metrics.run_name=stopped", "train.max_steps=3"))
    step, checkpoints, best = saved(tmp_path / "stopped")
    assert (step, checkpoints) == (3, ["step3"]) and len([b for b in best if b.startswith("best-stage0-")]) == 1
    summary = json.loads(finish(memr2("train", "--resume", "auto", *base, "metrics.run_name=stopped")).strip().splitlines()[-1])
    stopped = step_rows(tmp_path / "stopped")
    assert sorted(stopped) == [1, 2, 3, 4] and summary["steps"] == 4 and saved(tmp_path / "stopped")[:2] == (4, ["step4"])
    # The start's validation rode in step 1's round: its row (step 0) is written first all the same.
    rows = [json.loads(x) for x in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows[:2]] == [0, 1] and "val_f1" in rows[0] and "reward_mean" in rows[1]
    # Validation pools every question, with bootstrap intervals for each end and the paired gain.
    assert summary["val_questions"] >= 1 and len(summary["val_f1_gain_ci"]) == 2
    assert summary["val_f1_start_ci"][0] <= summary["val_f1_start"] <= summary["val_f1_start_ci"][1]
    assert "loss" in stopped[3] and stopped[3]["reward_mean"] > 0  # step 3 makes a real update
    assert all(stopped[s]["worker_failures"] == stopped[s]["tasks_retried"] == 0 and stopped[s]["live_workers"] == 2 for s in stopped)

    # Killed once step 3 is logged: its last checkpoint is step 2's (none at 3), so the resume
    # repeats step 3, whose logged row it drops first, and goes on to 4.
    victim = memr2("train", *base, "metrics.run_name=killed")
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "metrics.jsonl").is_file() or 3 not in step_rows(tmp_path / "killed"):
        assert victim.poll() is None, f"the run ended before its third step: {victim.communicate()[1][-3000:]}"
        assert time.time() < deadline, "no third step in 600 s"
        time.sleep(0.5)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    step, checkpoints, best = saved(tmp_path / "killed")
    assert (step, checkpoints) == (2, ["step2"]), "killed too late: after step 4's checkpoint"
    # Stage 1 starts from stage 0's best weights, a model folder: they are what step 2's
    # checkpoint, taken after the stage's end, holds.
    folder = tmp_path / "killed" / json.loads((tmp_path / "killed" / "state.json").read_text())["best"]
    assert folder.name.startswith("best-stage0-step") and (folder / "config.json").is_file()
    module = torch.load(tmp_path / "killed" / "checkpoints" / "step2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(module[k], v) for k, v in load_file(folder / "model.safetensors").items())
    finish(memr2("train", "--resume", "auto", *base, "metrics.run_name=killed"))
    killed = step_rows(tmp_path / "killed")
    assert sorted(killed) == [1, 2, 3, 4] and saved(tmp_path / "killed")[:2] == (4, ["step4"])

    # Step 3: the stopped run's ran on, the killed one's repeated after a resume; step 4 the other
    # way round. Each stage keeps one best folder, as the stopped run does.
    for s in (3, 4):
        for key in ("reward_mean", "format_failures", "generated_tokens", "degenerate_groups", "global_groups", "local_groups", "loss", "grad_norm", "policy_version"):
            assert killed[s].get(key) == pytest.approx(stopped[s].get(key), rel=1e-6, abs=1e-9), (s, key)
    assert saved(tmp_path / "killed")[2] == saved(tmp_path / "stopped")[2]
    # Overlapped: steps 2 and 4 trained on rows one update old (3's ran after a stage's start).
    assert [stopped[s].get("staleness_mean") for s in (2, 4)] == [pytest.approx(staleness)] * 2
    assert stopped[3]["staleness_mean"] == pytest.approx(0)
    for name in ("stopped", "killed"):
        out = tmp_path / name
        assert (out / "summary.json").is_file() and (out / "learning_curve.png").stat().st_size > 0
        assert (out / "policy" / "config.json").is_file()  # the final policy: `memr2 eval --policy <run>`
    assert summary["policy"] == str(tmp_path / "stopped" / "policy")
    assert summary["best"] == str(tmp_path / "stopped" / json.loads((tmp_path / "stopped" / "state.json").read_text())["best"])
