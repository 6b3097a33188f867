"""Whether this machine lets a test run a Ray cluster in its own PID and network namespace."""

import os
import shutil
import subprocess

import pytest


def namespaces_or_skip() -> None:
    """Skip with one line where unshare is missing or not permitted; under CI (MEMR2_CI=1) fail."""
    why = None
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        why = "needs unshare (util-linux) and ip (iproute2)"
    else:
        probe = subprocess.run(["unshare", "-p", "-n", "-f", "--mount-proc", "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            why = f"cannot make PID/network namespaces here (root needed): {probe.stderr.strip()[:120]}"
    if why:
        if os.environ.get("MEMR2_CI"):
            pytest.fail(why)
        pytest.skip(why)
