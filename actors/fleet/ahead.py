"""Rollouts one step ahead (train.max_staleness=1): the fleet runs step s+1's rollouts while the
learner updates on step s's, on the weights the engines hold, one update behind.

The weights reach the engines only at a step boundary, once those rollouts are done, so no
episode ever spans a sync: every sample of a batch comes from one policy version, the one before
the update it overlapped. Rollouts run in a thread of the driver (the fleet's calls are Ray
calls, which wait, so the learner's calls in the main thread go on meanwhile); only that thread
touches the fleet until `wait` returns.

A batch run ahead and not yet trained on is part of the run's state: `save` writes it beside a
checkpoint and `load` puts it back, so a resumed run updates on the very rows the killed one
would have (it cannot regenerate them: the policy that made them is one update before the
checkpoint's weights).
"""

from __future__ import annotations

import pickle
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from actors.fleet.batch import RolloutBatch
from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import StepPlan

AHEAD_FILE = "rollouts-ahead.pkl"


class RolloutsAhead:
    def __init__(self, fleet: RolloutFleet, max_staleness: int) -> None:
        if max_staleness not in (0, 1):
            raise ValueError(f"train.max_staleness must be 0 or 1, got {max_staleness}")
        self.fleet, self.max_staleness, self.enabled = fleet, max_staleness, max_staleness == 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts-ahead") if self.enabled else None
        self._step: int | None = None  # the step whose batch is running or done ahead
        self._future: Future[RolloutBatch] | None = None

    def take(self, plan: StepPlan) -> RolloutBatch:
        """This step's batch: the one run ahead if it is this step's, else run now."""
        if self._future is not None and self._step == plan.step:
            batch, self._future, self._step = self._future.result(), None, None
            return batch
        self.discard()
        return self.fleet.run(plan)

    def start(self, plan: StepPlan | None) -> None:
        """Begin `plan`'s rollouts in the background (nothing when overlap is off or no plan)."""
        if self.enabled and plan is not None:
            self._step, self._future = plan.step, self._pool.submit(self.fleet.run, plan)

    def wait(self) -> float:
        """Block until the batch ahead is done (the engines are free for the sync); seconds waited.
        A failure in its rollouts is raised here, as it would be from fleet.run."""
        start = time.perf_counter()
        if self._future is not None:
            self._future.result()
        return time.perf_counter() - start

    def discard(self) -> None:
        if self._future is not None:
            self._future.result()  # never leave rollouts running into the next batch
        self._future = self._step = None

    def save(self, folder: Path) -> None:
        if self._future is not None:
            with open(folder / AHEAD_FILE, "wb") as f:
                pickle.dump((self._step, self._future.result()), f)

    def load(self, folder: Path) -> None:
        path = folder / AHEAD_FILE
        if self.enabled and path.is_file():
            with open(path, "rb") as f:
                step, batch = pickle.load(f)
            self._step, self._future = step, Future()
            self._future.set_result(batch)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
