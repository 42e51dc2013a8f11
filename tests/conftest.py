"""Shared fixtures: one embedded Ray cluster per test session (started on first use)."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

# Lightning (torch._dynamo, triton) before TensorFlow, whatever test files run: imported the other way
# round in one process, triton's import segfaults in LLVM.
import lightning  # noqa: F401,E402

from tests.support.ray_head import ray_head, ray_two_nodes  # noqa: F401  (session fixtures)
from tests.support.sshd import sshd  # noqa: F401  (one sshd for the session)

# A suite started in the background of a shell without job control (`cmd &`, nohup, some CI runners)
# inherits SIGINT ignored, and Python then keeps it so: every Ctrl-C test would wait for nothing.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
_SIGNALS = (signal.SIGINT, signal.SIGUSR1)  # what Ray Tune and Lightning change; not SIGTERM, which ray.init sets
_SESSION_HANDLERS = {number: signal.getsignal(number) for number in _SIGNALS}


@pytest.fixture(autouse=True)
def _signal_handlers_as_the_session_began():
    """Each test meets the signal handlers the session began with. Ray Tune installs its own SIGINT
    handler and leaves it after the run (it only sets a flag), and Lightning sets SIGINT to ignored
    after a Ctrl-C: either would make every later Ctrl-C test of this process wait for nothing."""
    yield
    for number, handler in _SESSION_HANDLERS.items():
        if handler is not None and signal.getsignal(number) is not handler:
            signal.signal(number, handler)


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
    "tf": "imports TensorFlow (Keras' default backend here): every test under tests/keras/ but the JAX "
          "ones, and a test elsewhere marked so (@pytest.mark.tf)",
    "jax": "runs Keras on its JAX backend (tests/keras/ files named *jax*)",
}
_KERAS_TESTS = Path(__file__).parent / "keras"
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
        if item.path.is_relative_to(_KERAS_TESTS):  # Keras tests: on TensorFlow, but the JAX file's
            item.add_marker("jax" if "jax" in name else "tf")
