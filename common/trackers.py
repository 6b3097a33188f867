"""Experiment trackers (metrics.loggers): every row of metrics.jsonl, the run's config and its
summary also go to the tools researchers compare runs in, through each one's own client.

- tensorboard: runs/<name>/tensorboard/ (`tensorboard --logdir runs` shows every run).
- wandb: offline by default, under runs/<name>/wandb/; `wandb sync runs/<name>/wandb/offline-run-*`
  uploads it later. metrics.wandb_mode=online logs live (needs `wandb login`).
- mlflow: a SQLite store shared by the runs of one run root (runs/mlflow.db; `mlflow ui
  --backend-store-uri sqlite:///runs/mlflow.db`), or metrics.mlflow_tracking_uri.

A tracker that cannot start stops the run before anything else does (TrackerError, one line). One
that fails mid-run is counted (Trackers.errors, `tracker_errors` in the summary) and warned about
once; training never stops for it. On resume, the steps after the checkpoint are logged again:
TensorBoard's reader drops the older copies (it purges events past a step that restarts), W&B
keeps the first (it ignores steps below its last), MLflow keeps both in the metric's history.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common.config import Config


class TrackerError(ValueError):
    """A tracker that could not start: one line at the CLI."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers (what a tracker plots); lists, strings and flags stay in metrics.jsonl."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (algo.clip_eps), the form MLflow's params take."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, cfg: Config, run_dir: Path, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{cfg.model_dump_json(indent=1)}\n```")

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged

    def finish(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", f"```\n{json.dumps(summary, indent=1)}\n```")
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg: Config, run_dir: Path, run_name: str) -> None:
        import wandb

        # The run's name is its id: a resumed run continues the same W&B run.
        run_id = re.sub(r"[^\w.-]", "-", run_name)  # W&B ids may not hold / \\ # ? % :
        self.run = wandb.init(project=cfg.metrics.wandb_project, name=run_name, id=run_id, dir=str(run_dir),
                              mode=cfg.metrics.wandb_mode, config=cfg.model_dump(), resume="allow",
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log(scalars(row), step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        # W&B holds the last step's row until the step is committed, and committing it at finish
        # would overwrite the summary's keys that rows share ("steps": the run's steps in the
        # summary, optimizer steps in a row); commit it first, so the summary comes last.
        self.run.log({}, commit=True)
        self.run.summary.update(scalars(summary))
        self.run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: Config, run_dir: Path, run_name: str) -> None:
        from mlflow import MlflowClient

        uri = cfg.metrics.mlflow_tracking_uri or f"sqlite:///{run_dir.parent.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.metrics.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.metrics.mlflow_experiment)
        id_file = run_dir / "mlflow_run_id"  # a resumed run continues the same MLflow run
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            id_file.write_text(self.run_id)
            self._params(flat(cfg.model_dump()))

    def _params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, row: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars(row).items()])

    def finish(self, summary: dict[str, Any]) -> None:
        for key, value in summary.items():
            if value is not None and not isinstance(value, (dict, list)):
                self.client.set_tag(self.run_id, f"summary.{key}", str(value))
        self.client.set_terminated(self.run_id)


TRACKERS = {t.name: t for t in (TensorBoardTracker, WandbTracker, MlflowTracker)}


class Trackers:
    """The trackers metrics.loggers names besides jsonl, started together."""

    def __init__(self, cfg: Config, run_dir: Path, run_name: str) -> None:
        self.errors: Counter[str] = Counter()
        self.active = []
        for name in cfg.metrics.loggers:
            if name == "jsonl":
                continue
            try:
                self.active.append(TRACKERS[name](cfg, run_dir, run_name))
            except Exception as err:  # noqa: BLE001: any failure to start is the user's to fix, in one line
                self.finish({})
                raise TrackerError(f"metrics.loggers: {name} failed to start: {type(err).__name__}: {_first_line(err)}") from None

    def log(self, row: dict[str, Any], step: int) -> None:
        self._each("log", row, step)

    def finish(self, summary: dict[str, Any]) -> None:
        self._each("finish", {**summary, "tracker_errors": sum(self.errors.values())})
        self.active = []

    def _each(self, method: str, *args: Any) -> None:
        for tracker in self.active:
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001: a tracker's failure never stops training
                self.errors[tracker.name] += 1
                if self.errors[tracker.name] == 1:
                    print(f"warning: {tracker.name} failed ({type(err).__name__}: {_first_line(err)}); "
                          "training goes on, its failures are counted in tracker_errors", file=sys.stderr)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]
