import os

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster (2 CPUs, no dashboard), shared by the tests that need one and
    started again after a test that ran its own cluster (tests/test_fleet_nodes.py)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        # address="local": with none, Ray joins the cluster /tmp/ray/ray_current_cluster names (a
        # `ray.cluster_utils.Cluster` another test or session has running) and refuses num_cpus.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray


@pytest.fixture(scope="session")
def warm_tiny(tmp_path_factory):
    """The tiny model warm-started on tests/tiny_world.py's world (a folder), built once a session."""
    from tests.tiny_world import WARM, finish, memr2

    warm = tmp_path_factory.mktemp("warm-tiny") / "warm"
    finish(memr2("warmstart", "--out", str(warm), *WARM))
    return warm


def pytest_sessionfinish(session, exitstatus):
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
