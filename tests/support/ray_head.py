"""A real ``ray start --head`` cluster on loopback with token auth, owned by the test session."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    dashboard_url: str
    token: str = field(repr=False)
    token_path: str
    process: subprocess.Popen
    gcs_address: str = ""
    env: dict = field(default_factory=dict, repr=False)
    extra_nodes: list = field(default_factory=list)


def start_ray_head(num_cpus: int = 2) -> RayHead:
    folder = tempfile.mkdtemp(prefix="gph-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    token_path = Path(folder) / "token"
    token_path.write_text(token)
    token_path.chmod(0o600)
    dashboard_port = free_port()
    worker_low = 20000 + (os.getpid() * 7) % 20000
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path),
               PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    gcs_port = free_port()
    command = [
        str(Path(bin_dir) / "ray"), "start", "--head", "--block", f"--port={gcs_port}",
        f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--min-worker-port={worker_low}", f"--max-worker-port={worker_low + 200}",
        f"--num-cpus={num_cpus}", f"--temp-dir={folder}/ray", "--disable-usage-stats",
    ]
    process = subprocess.Popen(command, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        request = urllib.request.Request(url + "/api/v0/nodes?detail=1",
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if b'"ALIVE"' in response.read():
                    return RayHead(url, token, str(token_path), process, f"127.0.0.1:{gcs_port}", env)
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None:
            break
        time.sleep(0.5)
    stop_ray_head(RayHead(url, token, str(token_path), process))
    raise RuntimeError("ray start --head did not come up")


def add_worker_node(head: RayHead, num_cpus: int = 1) -> None:
    """A second Ray node on this machine, joined to ``head`` with the same token."""
    low = 40000 + (os.getpid() * 13) % 15000
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--block", f"--address={head.gcs_address}",
        f"--num-cpus={num_cpus}", f"--dashboard-agent-listen-port={free_port()}",
        f"--min-worker-port={low}", f"--max-worker-port={low + 200}", "--disable-usage-stats",
    ]
    process = subprocess.Popen(command, env=head.env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    head.extra_nodes.append(process)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        request = urllib.request.Request(head.dashboard_url + "/api/v0/nodes?detail=1",
                                         headers={"Authorization": f"Bearer {head.token}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            if response.read().count(b'"ALIVE"') >= 1 + len(head.extra_nodes):
                return
        time.sleep(0.5)
    raise RuntimeError("the second Ray node did not join")


def stop_ray_head(head: RayHead) -> None:
    for node in head.extra_nodes:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # SIGKILL at once: a test cluster has nothing to drain, and a SIGTERM to the group kills the GCS
    # first and leaves `ray start --block` waiting ~20 s for it (40 s of every suite's end, measured).
    # Ray's daemons (gcs, raylet, dashboard) run in the same session.
    subprocess.run(["pkill", "-9", "-s", str(head.process.pid)], check=False)
    try:
        head.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    shutil.rmtree(Path(head.token_path).parent, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_two_nodes():
    """Two Ray nodes of one CPU each, one cluster, on loopback."""
    head = start_ray_head(num_cpus=1)
    add_worker_node(head, num_cpus=1)
    yield head
    stop_ray_head(head)


@pytest.fixture(scope="session")
def ray_head():
    head = start_ray_head()
    yield head
    stop_ray_head(head)
