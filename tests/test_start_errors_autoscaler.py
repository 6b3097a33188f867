"""A job the cluster can never hold, with and without an autoscaler (actors.fleet.cluster.require_resources).

- No autoscaler (`ray.cluster_utils.Cluster`: its monitor runs Ray's read-only provider): the
  nodes are final, so a GPU on CPU-only nodes fails at once.
- An autoscaler that published its node groups (Ray's ClusterConfig in the GCS): its ceiling
  counts; what fits under it waits for the autoscaler as before.
- Ray's autoscaler with the fake multi-node provider (real raylets), in its own PID and network
  namespace as in tests/test_fleet_autoscaling.py: v2 reports the probe infeasible, which ends the
  wait; v1 reports nothing for placement groups, so the job waits out its budget as before.

Each cluster runs in a child process with its own RAY_TMPDIR: a `Cluster` writes its address into
the temp dir's ray_current_cluster, where another process's `ray.init()` would find it."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.namespaces import namespaces_or_skip

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: `cases` is [name, asks, timeout_s]; prints {name: [line or "placed", seconds]}.
PROBE = """
import json, sys, time
import ray
from actors.fleet.cluster import require_resources

def probe(cases):
    seen = {}
    for name, asks, timeout in cases:
        began = time.monotonic()
        try:
            require_resources(asks, timeout)
            seen[name] = ["placed", time.monotonic() - began]
        except ValueError as err:
            seen[name] = [str(err), time.monotonic() - began]
    return seen
"""

CLUSTER_JOB = PROBE + """
from ray.cluster_utils import Cluster
from ray.core.generated.autoscaler_pb2 import ClusterConfig

c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
c.add_node(num_cpus=1)
ray.init(address=c.address, log_to_driver=False, configure_logging=False)
c.wait_for_nodes()
try:
    seen = probe([["gpu", {"rollout actor": [{"CPU": 1, "GPU": 1}]}, 300]])
    config = ClusterConfig()
    group = config.node_group_configs.add(name="gpu", max_count=2)
    group.resources.update({"CPU": 4, "GPU": 1})
    ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())
    seen |= probe([["gpu3", {"learner rank": [{"GPU": 1}] * 3}, 300], ["gpu2", {"learner rank": [{"GPU": 2}]}, 300],
                   ["gpu1", {"learner rank": [{"GPU": 1}]}, 4]])
finally:
    ray.shutdown()
    c.shutdown()
print(json.dumps(seen))
"""

FIX = ("lower rollout.num_actors / cpus_per_actor / gpus_per_actor / resources or learner.num_ranks / cpus_per_rank / "
       "gpus_per_rank / resources, or add nodes")


def run_child(script: str, extra_env: dict[str, str], short_tmp: Path) -> dict:
    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(short_tmp), PYTHONPATH=str(ROOT),
               **extra_env)
    proc = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def short_tmp():
    """Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep."""
    path = Path(tempfile.mkdtemp(prefix="memr2-se-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_no_autoscaler_fails_at_once_and_published_node_groups_set_the_ceiling(short_tmp):
    seen = run_child([sys.executable, "-c", CLUSTER_JOB], {}, short_tmp)
    line, took = seen["gpu"]
    assert line == (f"the cluster cannot hold 1 rollout actor(s) of 1 CPU, 1 GPU (it has 2 CPU, 0 GPU) and never will: "
                    f"it has no autoscaler, and no node has 1 GPU (the most one has is 0): {FIX}")
    assert took < 30  # the monitor's first report, not the 300 s budget
    assert seen["gpu3"][0] == (f"the cluster cannot hold 3 learner rank(s) of 0 CPU, 1 GPU (it has 2 CPU, 0 GPU) and never "
                               f"will: its autoscaler's node groups reach 2 GPU of the 3 asked in all: {FIX}")
    assert seen["gpu2"][0] == (f"the cluster cannot hold 1 learner rank(s) of 0 CPU, 2 GPU (it has 2 CPU, 0 GPU) and never "
                               f"will: no node, now or of its autoscaler's node groups, has 2 GPU (the most one has is 1): {FIX}")
    assert seen["gpu3"][1] < 10 and seen["gpu2"][1] < 10
    # One GPU fits a node group: the autoscaler may add it, so the job waits out its budget.
    assert seen["gpu1"][0] == f"the cluster cannot hold 1 learner rank(s) of 0 CPU, 1 GPU (it has 2 CPU, 0 GPU) after 4 s: {FIX}"
    assert 3.5 < seen["gpu1"][1] < 15


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_with_ray_autoscaler_v2_its_verdict_ends_the_wait_and_v1_waits_as_before(short_tmp, version):
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    from tests.test_fleet_autoscaling import autoscaling_config

    namespaces_or_skip()
    (short_tmp / "cluster.yaml").write_text(yaml.safe_dump(autoscaling_config(version)))  # 0-CPU head, <= 2 one-CPU nodes
    cases = [["gpu", {"rollout actor": [{"CPU": 1, "GPU": 1}]}, 300 if version == "v2" else 6]]
    if version == "v2":
        cases += [["cpu3", {"rollout actor": [{"CPU": 1}] * 3}, 300], ["cpu1", {"rollout actor": [{"CPU": 1}]}, 300]]
    job = PROBE + f"\nray.init(address='127.0.0.1:6379', log_to_driver=False, configure_logging=False)\nprint(json.dumps(probe({cases!r})))\n"
    (short_tmp / "job.py").write_text(job)
    v2 = (f"RAY_enable_autoscaler_v2=1 RAY_CLOUD_INSTANCE_ID={FAKE_HEAD_NODE_ID} RAY_OVERRIDE_NODE_ID_FOR_TESTING={FAKE_HEAD_NODE_ID}"
          if version == "v2" else "")
    script = f"""
set -e
ip link set lo up
export PATH={Path(sys.executable).parent}:$PATH RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1
{v2} ray start --head --num-cpus=0 --port=6379 --autoscaling-config={short_tmp}/cluster.yaml --temp-dir={short_tmp}/ray \
    --disable-usage-stats --include-dashboard=false > {short_tmp}/head.log 2>&1
{sys.executable} {short_tmp}/job.py
"""
    seen = run_child(["unshare", "-p", "-n", "-f", "--mount-proc", "bash", "-c", script], {}, short_tmp)
    if version == "v1":  # v1 reports no verdict on placement groups: the budget runs out, as before
        assert seen["gpu"][0] == f"the cluster cannot hold 1 rollout actor(s) of 1 CPU, 1 GPU (it has 0 CPU, 0 GPU) after 6 s: {FIX}"
        assert seen["gpu"][1] > 5.5
        return
    verdict = "and never will: its autoscaler reports it infeasible (more than its node types and max workers allow)"
    assert seen["gpu"][0] == f"the cluster cannot hold 1 rollout actor(s) of 1 CPU, 1 GPU (it has 0 CPU, 0 GPU) {verdict}: {FIX}"
    assert seen["cpu3"][0].startswith("the cluster cannot hold 3 rollout actor(s) of 1 CPU, 0 GPU (it has ") and verdict in seen["cpu3"][0]
    assert seen["gpu"][1] < 60 and seen["cpu3"][1] < 60
    assert seen["cpu1"][0] == "placed"  # feasible: the autoscaler adds a node and the wait ends in the placement
