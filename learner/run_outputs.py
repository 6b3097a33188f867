"""A run's folder, `runs/<name>/`: metrics.jsonl, summary.json, the resume state, checkpoints and
the learning-curve PNG."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from common.config import Config
from common.metrics import MetricsLog, run_root


@dataclass
class TrainState:
    """Where the run stands after the last completed step: enough to resume it exactly."""

    step: int = 0
    stage: int = 0
    epoch: int = 0  # epochs done in the current stage
    batch: int = 0  # batches done in the current epoch
    checkpoint: str | None = None  # tag of this step's learner checkpoint
    best_val_f1: float | None = None
    best_tag: str | None = None
    val_f1_start: float | None = None
    val_f1_last: float | None = None
    validations: list[dict] = field(default_factory=list)


Resume = Literal["never", "always", "auto"]


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
        self.metrics = MetricsLog(self.path / "metrics.jsonl", cfg.metrics.prometheus)
        (self.path / "config.json").write_text(cfg.model_dump_json(indent=1))

    def load_state(self) -> TrainState:
        return TrainState(**json.loads((self.path / "state.json").read_text()))

    def save_state(self, state: TrainState) -> None:
        tmp = self.path / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(state), indent=1))
        tmp.replace(self.path / "state.json")  # atomic: a kill never leaves half a state

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=1))

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
