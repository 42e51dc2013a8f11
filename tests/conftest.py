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


# ----- markers: select by what a test needs (`pytest -m "not sshd and not multinode"`) ----------------
MARKERS = {
    "ray": "uses the session's embedded Ray cluster or its loopback `ray start --head` (fixtures)",
    "sshd": "uses the session's OpenSSH sshd on loopback (needs root and openssh-server)",
    "multinode": "starts a Ray cluster of several nodes (ray_two_nodes, or several fake RunPod pods)",
    "tf": "imports TensorFlow (Keras' default backend here)",
    "jax": "runs Keras on its JAX backend",
}
_RAY_FIXTURES = {"local_cluster", "ray_head", "ray_two_nodes"}
_SSHD_FIXTURES = {"sshd", "ssh_cluster"}


def pytest_configure(config):
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures, name, test = set(item.fixturenames), item.path.name, item.name
        if fixtures & _RAY_FIXTURES:
            item.add_marker("ray")
        if fixtures & _SSHD_FIXTURES:
            item.add_marker("sshd")
        if "ray_two_nodes" in fixtures or "two_nodes" in test or "two_pods" in test or "multi_node" in test:
            item.add_marker("multinode")
        if name.startswith("test_keras"):
            item.add_marker("jax" if "jax" in name else "tf")
