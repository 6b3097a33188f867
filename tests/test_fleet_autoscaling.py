"""Autoscaling on a real Ray autoscaler: the fake multi-node provider starts and stops real
raylets on this machine as the fleet's demand (pending workers, `request_resources`) asks.

The head, its autoscaler and every node run in their own PID and network namespace
(`unshare -p -n -f --mount-proc`, root), with their own temp dir and GCS on the namespace's
loopback: nothing outside is touched, and when the namespace's first process exits the kernel
ends every process in it, so nothing needs `ray stop` (which would end every Ray process on the
machine). Ray 2.60's own `AutoscalingCluster` cannot be used: it reads an example config its wheel
lacks, and it runs `ray stop --force`."""

import json
import os
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from tests.namespaces import namespaces_or_skip

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def autoscaling_config(version: str) -> dict:
    """A standard Ray cluster config for the fake provider: a head without CPUs, and up to two
    one-CPU worker nodes that go away after six idle seconds. v2 is KubeRay's autoscaler."""
    provider = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                "disable_launch_config_check": True, "gcs_address": "127.0.0.1:6379"}
    if version == "v2":  # v2 reads the provider's defaults from the example.yaml the wheel lacks, unless external
        provider |= {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID}
    return {
        "cluster_name": "memr2-fake",
        "max_workers": 2,
        "provider": provider,
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": 1, "object_store_memory": 400_000_000}, "node_config": {},
                               "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture
def short_tmp():
    """Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep."""
    path = Path(tempfile.mkdtemp(prefix="memr2-as-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_fleet_grows_with_the_autoscaler_on_backlog_and_shrinks_when_idle(short_tmp, version):
    namespaces_or_skip()
    tmp_path = short_tmp
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(autoscaling_config(version)))
    v2 = (f"RAY_enable_autoscaler_v2=1 RAY_CLOUD_INSTANCE_ID={FAKE_HEAD_NODE_ID} RAY_OVERRIDE_NODE_ID_FOR_TESTING={FAKE_HEAD_NODE_ID}"
          if version == "v2" else "")
    bin_dir = Path(sys.executable).parent
    script = f"""
set -e
ip link set lo up
export PATH={bin_dir}:$PATH RAY_AUTH_MODE=disabled RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1
{v2} ray start --head --num-cpus=0 --port=6379 --autoscaling-config={tmp_path}/cluster.yaml --temp-dir={tmp_path}/ray \
    --disable-usage-stats --include-dashboard=false > {tmp_path}/head.log 2>&1
{sys.executable} {ROOT}/tests/autoscale_job.py 127.0.0.1:6379
"""
    proc = subprocess.run(["unshare", "-p", "-n", "-f", "--mount-proc", "bash", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, RAY_ADDRESS=""))
    assert proc.returncode == 0, (proc.stderr[-3000:], _logs(tmp_path))
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(seen))
    assert seen["nodes_at_start"] == 0 and seen["workers_at_start"] == 1 and seen["nodes_first"] == 1  # starts at min
    grown = seen["steps"][-1]
    assert seen["grown"] and grown["live"] == 2 and grown["nodes"] == 2, seen["steps"]  # a node joined for the backlog
    assert len(grown["ran_on"]) == 2  # and the new worker took tasks
    assert grown["worker_versions"] == [5, 5] and grown["versions"] == [5]  # it carried the current policy
    assert seen["workers_after_idle"] == 1 and seen["nodes_after_idle"] == 1, seen  # drained back to min
    assert seen["faults"]["worker_failures"] == 0


def _logs(tmp_path: Path) -> str:
    out = []
    for name in ("monitor.err", "monitor.log", "monitor.out"):
        for f in sorted((tmp_path / "ray").glob(f"session_*/logs/{name}")):
            out.append(f.read_text()[-2000:])
    return "\n".join(out)[-6000:]
