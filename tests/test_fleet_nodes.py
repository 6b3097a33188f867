"""The fleet across nodes: `ray.cluster_utils.Cluster` runs a head and three one-CPU worker nodes
on this machine (real raylets). Workers spread over nodes; removing a worker's node mid-step
loses no group and duplicates none."""

import pytest
import ray
from ray.cluster_utils import Cluster

from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
from actors.rollout_job import smoke_config
from common.data import load_dataset, split
from tests.fleet_util import disturbed_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()  # the other tests' local cluster; tests/conftest.py starts it again after
    # The head holds no CPU: the driver, the snapshot keeper and the policy store live there,
    # rollout workers only on the worker nodes.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_workers_spread_over_nodes_and_a_removed_node_loses_no_group(cluster):
    c, nodes = cluster
    cfg = smoke_config(None, ["rollout.max_new_tokens=24", "metrics.prometheus=false", "cluster.worker_placement=spread"])
    conversations = split(load_dataset(cfg.data), cfg.data)["train"]
    fleet = RolloutFleet(cfg)
    try:
        head = c.head_node.node_id
        placed = {s.info["node"] for s in fleet.live()}
        assert len(placed) == 2 and head not in placed  # one worker per node, none on the head
        plan = plan_step(cfg, conversations, cfg.rollout.horizon, step=0)
        by_id = {n.node_id: n for n in nodes}
        faults, seen = disturbed_step(fleet, plan, lambda slot: c.remove_node(by_id[slot.info["node"]], allow_graceful=False))
        assert faults["worker_failures"] == 1 and faults["tasks_retried"] >= 1 and faults["duplicate_results"] == 0
        fleet.await_target()  # the replacement lands on the third node
        now = {s.info["node"] for s in fleet.live()}
        assert len(now) == 2 and seen["node"] not in now and head not in now
    finally:
        fleet.shutdown()
