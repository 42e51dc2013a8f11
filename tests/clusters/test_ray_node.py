"""ray_node: the ``ray start`` command, its environment, its checks, and a real head on loopback."""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gpu_proxy.clusters.ray_node import (RayNodeSpec, RayPorts, default_ray_executable, generate_token,
                                         session_pids, start_node, wait_for_nodes)
from gpu_proxy.errors import ConfigurationError


def write_token(folder: str) -> tuple[str, str]:
    token = generate_token()
    path = Path(folder) / "token"
    path.write_text(token)
    path.chmod(0o600)
    return token, str(path)


def test_token_has_rays_own_format():
    tokens = {generate_token() for _ in range(20)}
    assert len(tokens) == 20
    assert all(re.fullmatch(r"[0-9a-f]{64}", token) for token in tokens)


def test_head_command_binds_dashboard_to_loopback_and_carries_no_secret():
    spec = RayNodeSpec("head", "10.0.0.5", "/secrets/ray_token", ports=RayPorts(gcs=7000, dashboard=7001),
                       num_cpus=4, num_gpus=8, temp_dir="/tmp/gp-x", ray_executable="/opt/venv/bin/ray")
    command = spec.command()
    assert command[:3] == ["/opt/venv/bin/ray", "start", "--block"]
    for flag in ("--head", "--dashboard-host=127.0.0.1", "--node-ip-address=10.0.0.5", "--port=7000",
                 "--dashboard-port=7001", "--num-cpus=4", "--num-gpus=8", "--temp-dir=/tmp/gp-x"):
        assert flag in command
    assert spec.gcs_address == "10.0.0.5:7000"
    env = spec.environment({"PATH": "/usr/bin", "RAY_AUTH_TOKEN": "inherited", "RAY_ADDRESS": "x:1"})
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == "/secrets/ray_token"
    assert "RAY_AUTH_TOKEN" not in env and "RAY_ADDRESS" not in env
    assert env["PATH"].split(os.pathsep)[0] == "/opt/venv/bin"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env  # a head with a private IP takes workers


def test_worker_command_joins_head_and_skips_head_only_ports():
    ports = RayPorts(gcs=7000, dashboard=7001, client_server=7002, node_manager=7003, min_worker=30000,
                     max_worker=30010)
    spec = RayNodeSpec("worker", "10.0.0.6", "/t", head_address="10.0.0.5:7000", ports=ports)
    command = spec.command()
    assert "--address=10.0.0.5:7000" in command and "--head" not in command
    assert "--node-manager-port=7003" in command and "--min-worker-port=30000" in command
    assert not any(flag.startswith(("--port=", "--dashboard-port", "--ray-client-server-port"))
                   for flag in command)


def test_loopback_head_keeps_ray_on_loopback():
    spec = RayNodeSpec("head", "127.0.0.1", "/t")
    assert spec.loopback_only
    assert spec.environment({})["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


@pytest.mark.parametrize("kwargs, words", [
    (dict(role="head", node_ip="8.8.8.8"), ["8.8.8.8", "public"]),
    (dict(role="head", node_ip="0.0.0.0"), ["0.0.0.0", "every interface"]),
    (dict(role="head", node_ip="gpu1.example.com"), ["gpu1.example.com", "not an IP"]),
    (dict(role="boss", node_ip="10.0.0.1"), ["boss", "'head' or a 'worker'"]),
    (dict(role="worker", node_ip="10.0.0.2"), ["head_address"]),
    (dict(role="worker", node_ip="10.0.0.2", head_address="10.0.0.1"), ["10.0.0.1", "host:port"]),
    (dict(role="worker", node_ip="10.0.0.2", head_address="1.1.1.1:6379"), ["1.1.1.1", "public"]),
    (dict(role="worker", node_ip="127.0.0.1", head_address="127.0.0.1:6379"), ["127.0.0.1", "private IP"]),
    (dict(role="head", node_ip="10.0.0.1", head_address="10.0.0.9:6379"), ["head_address"]),
    (dict(role="head", node_ip="10.0.0.1", num_gpus=-1), ["num_gpus=-1"]),
    (dict(role="head", node_ip="10.0.0.1", num_gpus="2"), ["num_gpus='2'"]),
])
def test_bad_node_specs_are_refused_with_the_value_and_the_fix(kwargs, words):
    with pytest.raises(ConfigurationError) as caught:
        RayNodeSpec(token_file="/t", **kwargs)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("kwargs, word", [(dict(gcs=80), "gcs=80"), (dict(dashboard=70000), "70000"),
                                          (dict(min_worker=30000), "both"),
                                          (dict(min_worker=30010, max_worker=30000), "above")])
def test_bad_ports_are_refused(kwargs, word):
    with pytest.raises(ConfigurationError, match=word):
        RayPorts(**kwargs)


def test_free_ports_are_distinct():
    ports = RayPorts.free_on_this_machine(worker_port_count=16)
    singles = [value for name, value in vars(ports).items() if name not in ("min_worker", "max_worker")]
    assert len(set(singles)) == len(singles)
    assert ports.max_worker - ports.min_worker == 15
    assert not any(ports.min_worker <= port <= ports.max_worker for port in singles)


def test_start_refuses_a_token_file_others_can_read(tmp_path):
    token_path = tmp_path / "token"
    token_path.write_text(generate_token())
    token_path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        start_node(RayNodeSpec("head", "127.0.0.1", str(token_path)))
    with pytest.raises(ConfigurationError, match="missing or empty"):
        start_node(RayNodeSpec("head", "127.0.0.1", str(tmp_path / "absent")))


def test_loopback_head_starts_with_token_auth_and_stops_leaving_no_process():
    folder = tempfile.mkdtemp(prefix="gprn-", dir="/tmp")  # short: Ray's socket paths are length-limited
    token, token_path = write_token(folder)
    ports = RayPorts.free_on_this_machine()
    spec = RayNodeSpec("head", "127.0.0.1", token_path, ports=ports, num_cpus=1, temp_dir=f"{folder}/r",
                       ray_executable=default_ray_executable())
    node = start_node(spec, log_path=f"{folder}/head.log")
    try:
        url = f"http://127.0.0.1:{spec.dashboard_port}"
        nodes = wait_for_nodes(url, token, 1, timeout_s=120,
                               failure=lambda: None if node.alive() else f"head died:\n{node.log_tail()}")
        assert nodes[0]["resources_total"]["CPU"] == 1
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/api/version", timeout=5)
        assert refused.value.code == 401
        request = urllib.request.Request(url + "/api/version", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200
        assert len(session_pids(node.pid)) >= 3  # ray start, GCS, raylet, dashboard...
        assert stat.S_IMODE(os.stat(token_path).st_mode) == 0o600
    finally:
        node.stop()
        stopped = session_pids(node.pid)
        shutil.rmtree(folder, ignore_errors=True)
    assert stopped == []
