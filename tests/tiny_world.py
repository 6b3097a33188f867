"""A world small enough for end-to-end runs of the tiny model, and a warm start that memorises its
training conversation's gold outputs: a policy that writes real memories, with a little sampling
spread left at temperature 1, so some groups carry signal and steps update (tests/conftest.py's
`warm_tiny` builds it once a session)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One training conversation (synth-0-0) of two sessions, one chunk each, and one to validate.
WORLD = ["model.name=tiny", "learner.frozen_layers=0", "learner.bf16=off", "learner.cpus_per_rank=1",
         "data.synth.conversations=2", "data.synth.sessions=2", "data.synth.val_conversations=1", "rollout.chunks_per_session=1"]
WARM = [*WORLD, "train.warmstart.synth.seed=0", "train.warmstart.synth.conversations=1", "train.warmstart.synth.sessions=2",
        "train.warmstart.synth.val_conversations=0", "train.warmstart.epochs=100", "train.warmstart.lr=3e-3",
        "train.warmstart.mini_batch=4", "train.warmstart.micro_batch=4"]


def memr2(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "memr2", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out
