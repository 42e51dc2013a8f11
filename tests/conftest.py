"""Shared fixtures: one embedded Ray cluster per test session (started on first use)."""
from __future__ import annotations

import pytest

# Lightning (torch._dynamo, triton) before TensorFlow, whatever test files run: imported the other way
# round in one process, triton's import segfaults in LLVM.
import lightning  # noqa: F401,E402

from tests.support.ray_head import ray_head, ray_two_nodes  # noqa: F401  (session fixtures)
from tests.support.sshd import sshd  # noqa: F401  (one sshd for the session)


@pytest.fixture(scope="session")
def local_cluster():
    from gpu_proxy.clusters.local import default_local_cluster

    cluster = default_local_cluster()
    cluster.start()
    yield cluster
