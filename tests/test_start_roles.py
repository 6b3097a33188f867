"""The learner's ranks and the fleet's engines start side by side (learner.train.start_roles): a
role that fails to start leaves nothing of the other holding the cluster."""

import time

import pytest
import ray

from actors.rollout_job import smoke_config
from learner.deepspeed_learner import Learner
from learner.ranks import LearnerRank
from learner.train import start_roles

pytestmark = pytest.mark.slow


def broken_rank() -> type[LearnerRank]:
    """A rank whose set-up fails, as one on a full disk or a bad node does. Defined in a function,
    so Ray ships the class by value (the ranks cannot import this test module)."""

    class BrokenRank(LearnerRank):
        def setup(self, *args):
            raise RuntimeError("no space left on device")

    return BrokenRank


def cpus_back(total: float, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) == total:
            return True
        time.sleep(0.5)
    return False


def test_a_learner_that_cannot_start_stops_the_fleet_started_beside_it(ray_local, monkeypatch):
    cfg = smoke_config(None, ["learner.cpus_per_rank=0.5", "rollout.cpus_per_actor=0.5", "rollout.num_actors=1"])
    total = ray.cluster_resources()["CPU"]
    monkeypatch.setattr(Learner, "rank_class", broken_rank())
    with pytest.raises(RuntimeError, match="no space left on device"):  # the ranks' error, not the fleet's
        start_roles(cfg, "tiny", "broken-learner", offload=False)
    assert cpus_back(total), f"CPUs still held: {ray.available_resources().get('CPU')} of {total} free"
