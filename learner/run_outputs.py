"""A run's folder, `runs/<name>/`: metrics.jsonl, summary.json, the resume state, the learner's
DeepSpeed step checkpoints (checkpoints/step<n>/), the best weights of each curriculum stage as
model folders (best-stage<k>-step<n>/), the final policy/ and the learning-curve PNG."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from common.config import Config
from common.metrics import MetricsLog, run_root
from common.trackers import Trackers


@dataclass
class TrainState:
    """Where the run stands after the last completed step: enough to resume it exactly."""

    step: int = 0
    stage: int = 0
    epoch: int = 0  # epochs done in the current stage
    batch: int = 0  # batches done in the current epoch
    checkpoint: str | None = None  # tag of this step's learner checkpoint
    best_val_f1: float | None = None
    best: str | None = None  # the best validated weights so far: a model folder in the run's folder
    val_f1_start: float | None = None
    val_f1_last: float | None = None
    validations: list[dict] = field(default_factory=list)


Resume = Literal["never", "always", "auto"]


class CheckpointWriteError(ValueError):
    """A checkpoint or model folder that could not be written: one line at the CLI."""

# What prune() manages: step checkpoints (checkpoints/step<n>) and best folders (best-stage<k>-step<n>).
PRUNED = re.compile(r"(best-stage\d+-)?step(\d+)")


def checkpoint_disk_peak_files(cfg: Config) -> dict[str, int]:
    """How many weight copies a run of `cfg` holds on disk at once at worst, for a planner to
    multiply by their sizes (counts, not bytes; other files are small):

    deepspeed_checkpoints: full DeepSpeed step checkpoints, each every rank's bit16 weights, fp32
        master weights and Adam moments (~14 B per trained parameter in bf16, 16 in fp32; a
        frozen one only has its weight): train.keep_checkpoints, plus the next one while it is
        written before the oldest goes.
    model_folders: HF model folders of the weights (2 B per parameter in bf16, 4 in fp32): one
        best per curriculum stage, plus the current stage's next best while it is written before
        the one the saved state names goes; the final policy/ (a run stopped by train.max_steps
        leaves one while a resumed run trains on); and the warm start, if enabled.
    """
    return {
        "deepspeed_checkpoints": cfg.train.keep_checkpoints + 1,
        "model_folders": len(cfg.curriculum.stages) + 1 + 1 + int(cfg.train.warmstart.enabled),
    }


class RunDir:
    """resume: "always" needs a checkpointed run; "auto" resumes one if present and starts fresh
    otherwise (a retried RayJob continues instead of restarting); "never" refuses to overwrite."""

    def __init__(self, cfg: Config, resume: Resume) -> None:
        name = cfg.metrics.run_name or time.strftime("train-%Y%m%d-%H%M%S")
        self.name = name
        self.path = run_root(cfg) / name
        checkpointed = (self.path / "state.json").exists()
        if resume == "never" and checkpointed:
            raise ValueError(f"run {self.path} exists: pass --resume to continue it or choose metrics.run_name")
        if resume == "always" and not checkpointed:
            raise ValueError(f"--resume: no checkpointed run at {self.path} (set metrics.run_name)")
        self.resumed = checkpointed and resume != "never"
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.policy = self.path / "policy"  # the final weights as a model folder (memr2 eval)
        self.keep = cfg.train.keep_checkpoints
        self.saved_step = -1  # the step of the state on disk: none yet
        if not self.resumed:  # a run killed before its first checkpoint starts over: so do its rows
            (self.path / "metrics.jsonl").unlink(missing_ok=True)
        self.metrics = MetricsLog(self.path / "metrics.jsonl", cfg.metrics.prometheus, Trackers(cfg, self.path, name))
        (self.path / "config.json").write_text(cfg.model_dump_json(indent=1))

    def load_state(self) -> TrainState:
        state = TrainState(**json.loads((self.path / "state.json").read_text()))
        self.saved_step = state.step
        return state

    def save_state(self, state: TrainState) -> None:
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(state), indent=1))
        tmp.replace(self.path / "state.json")  # atomic: a kill never leaves half a state
        self.saved_step = state.step

    @contextmanager
    def writing(self, folder: Path, need_bytes: int) -> Iterator[None]:
        """A write into `folder` (and the state naming it) that fails (a full disk, a read-only
        mount) removes what it wrote and stops the run in one line: the previous checkpoint and
        the state naming it are untouched, so `--resume auto` continues from that step."""
        try:
            yield
        except OSError as err:  # also a rank's: Ray raises its error as an instance of the cause
            from actors.fleet.errors import one_line

            shutil.rmtree(folder, ignore_errors=True)
            (self.path / "state.json.tmp").unlink(missing_ok=True)
            free = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
            resume = f"step {self.saved_step}" if self.saved_step >= 0 else "the start"
            raise CheckpointWriteError(
                f"could not write {folder} ({one_line(err)}): it needs {need_bytes / 1e9:.3f} GB, the file system has "
                f"{free / 1e9:.3f} GB free; removed what was written; `--resume auto` continues from {resume}"
            ) from None

    def prune(self, best: str | None = None) -> None:
        """Remove the weights no resume can need. Of the step checkpoints the state on disk covers
        (step <= its step), all but the newest keep_checkpoints; of each stage's best folders it
        covers, all but the newest. Every newer one too: a killed run's, which the resume repeats
        and writes again (so no tag lands in a stale folder); all but `best`, the folder the state
        in memory names and the next save_state will."""
        found = defaultdict(list)  # "" (step checkpoints) or "best-stage<k>-": [(step, folder)]
        for folder in [*self.checkpoints.glob("step*"), *self.path.glob("best-stage*-step*")]:
            if (m := PRUNED.fullmatch(folder.name)) and folder.is_dir():
                found[m[1] or ""].append((int(m[2]), folder))
        for kind, folders in found.items():
            covered = sorted(f for f in folders if f[0] <= self.saved_step)
            kept = covered[-(self.keep if kind == "" else 1) :]
            for f in folders:
                if f not in kept and f[1].name != best:
                    shutil.rmtree(f[1], ignore_errors=True)

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=1))
        self.metrics.finish(summary)

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.metrics.rows()
        steps = [r for r in rows if "reward_mean" in r]
        vals = [r for r in rows if r.get("val_f1") is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in steps], [r["reward_mean"] for r in steps], label="rollout reward (mean)", color="tab:blue")
        ax.plot([r["step"] for r in vals], [r["val_f1"] for r in vals], "o-", label="validation F1", color="tab:orange")
        ax.set_xlabel("training step")
        ax.set_title(f"Memory-R2 LoGo-GRPO: {self.name}")
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.path / "learning_curve.png"
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out
