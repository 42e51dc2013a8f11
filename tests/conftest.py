"""Shared fixtures: one embedded Ray cluster per test session (started on first use)."""
from __future__ import annotations

import pytest

from tests.support.ray_head import ray_head, ray_two_nodes  # noqa: F401  (session fixtures)


@pytest.fixture(scope="session")
def local_cluster():
    from gpu_proxy.clusters.local import default_local_cluster

    cluster = default_local_cluster()
    cluster.start()
    yield cluster
