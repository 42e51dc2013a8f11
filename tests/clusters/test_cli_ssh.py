"""`gpu-proxy up ssh` starts Ray on a machine over SSH and saves it; later commands reach it through a
tunnel with the saved token; `down` stops the nodes it started."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gpu_proxy.clusters.ray_node import default_ray_executable
from tests.support.processes import processes_mentioning

CLI = [sys.executable, "-m", "gpu_proxy.cli"]


def cli(*args, env):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.timeout(400)
def test_up_ssh_status_runs_and_down(sshd, tmp_path):
    env = dict(os.environ, GPU_PROXY_CONFIG_DIR=str(tmp_path))
    up = cli("up", "ssh", "--name", "box", "--head", f"{sshd.user}@127.0.0.1:{sshd.port}",
             "--identity-file", sshd.private_key, "--known-hosts-file", sshd.known_hosts,
             "--private-ip", "127.0.0.1", "--ray-executable", default_ray_executable(), "--free-ports", env=env)
    assert up.returncode == 0, up.stderr[-2000:]
    assert "is up: 2 CPUs" in up.stdout
    token_file = tmp_path / "tokens" / "box"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text()
    import json

    node_folders = [n["folder"] for n in json.loads((tmp_path / "clusters.json").read_text())["box"]["nodes"]]
    assert processes_mentioning(node_folders[0]), "the head's Ray processes run from its folder"
    try:
        status = cli("status", "box", env=env)
        assert status.returncode == 0 and "box" in status.stdout and "up" in status.stdout
        runs = cli("runs", "-c", "box", env=env)
        assert runs.returncode == 0 and "RUN" in runs.stdout
        assert token not in up.stdout + up.stderr + status.stdout + runs.stdout
    finally:
        down = cli("down", "box", env=env)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "torn down" in down.stdout and not token_file.exists()
    deadline = time.monotonic() + 15  # processes killed by `down` may take a moment to be reaped
    while processes_mentioning(node_folders[0]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(node_folders[0]), "down leaves no Ray process of the cluster"
