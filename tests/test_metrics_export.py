"""The fleet's series as a real Ray node exports them: the names the dashboard and its promtool
test use are the names Prometheus scrapes (Ray adds `ray_`, and `_total` to counters)."""

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actors.fleet.metrics import exported_series

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, time, urllib.request, ray
    from actors.fleet.metrics import fleet_series, worker_series, FLEET_GAUGES, FLEET_COUNTERS, WORKER_GAUGES, WORKER_COUNTERS
    port = int(sys.argv[1])
    ray.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port, configure_logging=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Worker:  # where worker series live: inside the rollout actor
        def go(self):
            s = worker_series("r1", "w0", True)
            for n in WORKER_GAUGES: s.set(n, 3)
            for n in WORKER_COUNTERS: s.inc(n, 7)

    ray.get(Worker.remote().go.remote())
    s = fleet_series("r1", True)
    for n in FLEET_GAUGES: s.set(n, 2)
    for n in FLEET_COUNTERS: s.inc(n)
    names, deadline = set(), time.time() + 60
    while time.time() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        names = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_memr2_")}
        if len(names) >= int(sys.argv[2]):
            break
        time.sleep(2)
    print(" ".join(sorted(names)))
""")


def test_a_ray_node_exports_the_fleet_series_under_the_names_the_dashboard_queries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    want = exported_series()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(port), str(len(want))], capture_output=True, text=True, timeout=180,
                          env={"RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(proc.stdout.split()) == set(want)
