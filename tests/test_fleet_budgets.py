"""A rollout worker's two start budgets (actors.fleet.budgets): placement, from the request until
the worker's process runs on a node, and the engine's start, from placement until it is live.
Exact on a fake timeline; then on a real Ray cluster, a worker whose engine never gets ready."""

import time

import pytest

from actors.fleet import fleet as fleet_module
from actors.fleet.budgets import StartBudget
from actors.fleet.errors import WorkerStartError
from actors.fleet.fleet import RolloutFleet
from actors.fleet.slots import Slot
from actors.fleet.worker import RolloutWorker
from common.config import ConfigError, load_config

BUDGET = StartBudget(placement_s=300, start_s=900)
PENDING = object()  # a call not answered yet (the fleet holds a Ray ref there)


def slot(requested_at: float, placed_at: float | None = None, live: bool = False) -> Slot:
    placed = PENDING if placed_at is None else None
    return Slot("w", None, requested_at, placed, None if live else PENDING, placed_at=placed_at)


def test_an_engine_still_loading_is_placed_not_unplaceable():
    loading = slot(0, placed_at=10)
    assert not BUDGET.none_placeable([loading], now=500)  # long past 300 s since its request: placed
    assert not BUDGET.starting_too_long(loading, now=910)  # 900 s after placement, not more
    assert BUDGET.starting_too_long(loading, now=910.5)
    assert not BUDGET.starting_too_long(slot(0, placed_at=10, live=True), now=10_000)  # live: done
    assert not BUDGET.starting_too_long(slot(0), now=10_000)  # unplaced: placement's budget, not this one


def test_placement_is_timed_from_the_request_and_stops_only_when_nothing_is_placed():
    assert not BUDGET.none_placeable([slot(0)], now=300)
    assert BUDGET.none_placeable([slot(0)], now=300.5)
    assert BUDGET.none_placeable([slot(0), slot(250)], now=300.5)  # the oldest request waited too long
    assert not BUDGET.none_placeable([slot(0), slot(250, placed_at=260)], now=300.5)  # one is starting
    assert not BUDGET.none_placeable([slot(0), slot(250, placed_at=260, live=True)], now=300.5)  # one is live
    assert not BUDGET.none_placeable([], now=1e9)


def test_start_up_waits_for_placed_workers_and_young_requests_only():
    live, young, old, loading = slot(0, 1, live=True), slot(200), slot(0), slot(0, placed_at=280)
    assert BUDGET.awaited([live, young, old, loading], now=301) == [young, loading]
    assert BUDGET.awaited([live, old], now=301) == []  # go on with the live one; the old stays pending


def test_no_budget_never_runs_out():
    unlimited = StartBudget(None, None)
    assert not unlimited.none_placeable([slot(0)], now=1e9)
    assert not unlimited.starting_too_long(slot(0, placed_at=0), now=1e9)
    assert unlimited.awaited([slot(0)], now=1e9) != []


def test_the_budgets_come_from_the_config_and_paper_yaml_sizes_them_for_7b():
    cfg = load_config(None, [])
    assert StartBudget.from_config(cfg.cluster) == StartBudget(300, 900)
    paper = load_config("deploy/paper.yaml", []).cluster
    assert (paper.placement_timeout_s, paper.worker_start_timeout_s) == (600, 1800)
    with pytest.raises(ConfigError, match=r"^config cluster.worker_start_timeout_s: Input should be greater than 0, got 0$"):
        load_config(None, ["cluster.worker_start_timeout_s=0"])


def fake_engine(start_s: float) -> type:
    """A rollout worker whose engine takes start_s to start and then generates nothing (defined
    in a function: Ray ships the class by value)."""

    class SlowEngine(RolloutWorker):
        def start(self) -> dict:
            time.sleep(start_s)  # a 7B download and load, say
            return {"worker": self.worker_id}

    return SlowEngine


def fleet_with(monkeypatch, start_s: float, *overrides: str) -> RolloutFleet:
    monkeypatch.setattr(fleet_module, "RolloutWorker", fake_engine(start_s))
    return RolloutFleet(load_config(None, ["rollout.num_actors=1", "rollout.cpus_per_actor=0.5", "metrics.prometheus=false", *overrides]))


@pytest.mark.slow
def test_an_engine_that_starts_for_longer_than_the_placement_budget_still_joins(ray_local, monkeypatch):
    began = time.monotonic()
    fleet = fleet_with(monkeypatch, 20, "cluster.placement_timeout_s=15", "cluster.worker_start_timeout_s=120")
    try:
        assert len(fleet.live()) == 1 and time.monotonic() - began > 20
        assert fleet.take_faults()["worker_failures"] == 0
    finally:
        fleet.shutdown()


@pytest.mark.slow
def test_a_worker_whose_engine_is_not_ready_in_time_is_replaced_then_the_job_stops_in_one_line(ray_local, monkeypatch):
    began = time.monotonic()
    with pytest.raises(WorkerStartError) as err:
        fleet_with(monkeypatch, 3600, "cluster.worker_start_timeout_s=2", "cluster.max_task_attempts=3")
    assert str(err.value) == ("rollout workers fail to start (3 in a row): "
                              "engine not ready 2 s after placement (cluster.worker_start_timeout_s)")
    assert isinstance(err.value, ValueError)  # the CLI prints it as one line
    assert time.monotonic() - began > 3 * 2  # each of the three had its 2 s after placement


@pytest.mark.slow
def test_a_worker_no_node_can_hold_stops_after_the_placement_budget(ray_local):
    cfg = load_config(None, ["rollout.num_actors=1", "rollout.resources={nowhere: 1}", "metrics.prometheus=false",
                             "cluster.placement_timeout_s=2"])
    with pytest.raises(ValueError, match=r"^no rollout worker \(1 CPU, 1 nowhere\) could be placed within 2 s \(cluster.placement_timeout_s; "):
        RolloutFleet(cfg)
