import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole test session (2 CPUs, no dashboard)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
