"""`gpu-proxy up runpod` against the fake RunPod API (real entrypoint, real sshd, real Ray): the estimate
and its confirmation, a kept and saved cluster that `status`, `dashboard`, a run by name and `down` reach
again, and zero pods after `down`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import gpu_proxy_lightning  # noqa: F401
from tests.fakes.runpod_api import EntrypointRuntime, FakeRunPod
from tests.lightning_project.models import fit_and_check_against_rank0
from tests.support.sshd import sshd_missing_reason

CLI = [sys.executable, "-m", "gpu_proxy.cli"]
IMAGE = "registry.example.com/gpu-proxy-node:test"


@pytest.fixture(scope="module")
def fake():
    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    runtime = EntrypointRuntime(num_cpus=2)
    with FakeRunPod(runtime) as server:
        yield server
        assert server.violations == []
    runtime.close()


def _env(fake: FakeRunPod, config: str) -> dict:
    return dict(os.environ, GPU_PROXY_CONFIG_DIR=config, RUNPOD_API_KEY=fake.api_key, RUNPOD_REST_URL=fake.url,
                GPU_PROXY_RUNPOD_IMAGE=IMAGE)


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=240,
                          stdin=subprocess.DEVNULL)


def test_up_shows_the_estimate_and_refuses_to_launch_unconfirmed_above_the_threshold(fake, tmp_path):
    before = len(fake.requests)
    up = cli("up", "runpod", "--gpu", "RTX A4000", "--gpus-per-node", "2", "--nodes", "2", "--confirm-above", "0.5",
             "--name", "pricey", env=_env(fake, str(tmp_path)))
    assert up.returncode == 1
    assert "estimated cost: 2 x 2 x NVIDIA RTX A4000" in up.stdout and "$1.00/hour" in up.stdout
    assert "pass --yes" in up.stderr
    assert not any(method == "POST" for method, _, _ in fake.requests[before:])
    assert not (tmp_path / "clusters.json").exists()


@pytest.mark.timeout(400)
def test_up_keeps_and_saves_the_pods_for_status_dashboard_runs_and_down(fake, tmp_path, monkeypatch):
    config = tmp_path / "config"
    env = _env(fake, str(config))
    up = cli("up", "runpod", "--gpu", "RTX A4000", "--gpus-per-node", "2", "--idle-timeout", "10m", "--budget-usd", "50",
             "--free-ports", "--yes", "--name", "pods", env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    assert "estimated cost" in up.stdout and "cluster 'pods' is up: 1 pod(s), 2 CPUs, 2 GPUs, $0.50/hour" in up.stdout
    definition = json.loads((config / "clusters.json").read_text())["pods"]
    (pod_id,) = definition["pod_ids"]
    assert definition["kind"] == "runpod" and [p.id for p in fake.live_pods()] == [pod_id]  # kept after `up` exited
    token_file = config / "tokens" / "pods"
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert os.stat(definition["identity_file"]).st_mode & 0o777 == 0o600
    token = token_file.read_text()
    assert token not in json.dumps(definition) and token not in up.stdout + up.stderr
    try:
        status = cli("status", "pods", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        row = next(line for line in status.stdout.splitlines() if line.startswith("pods"))
        assert " up " in row and "$0.50/h, budget $50)" in row and "http://127.0.0.1:" in row

        dashboard = subprocess.Popen([*CLI, "dashboard", "pods"], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            url = dashboard.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:"), dashboard.stderr.read() if dashboard.poll() else url
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url + "/api/version", timeout=10)
            assert refused.value.code == 401  # through the tunnel, and only with the token
            request = urllib.request.Request(url + "/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert answer.status == 200
        finally:
            dashboard.send_signal(signal.SIGINT)
            dashboard.wait(timeout=30)

        monkeypatch.setenv("GPU_PROXY_CONFIG_DIR", str(config))
        monkeypatch.setenv("RUNPOD_API_KEY", fake.api_key)
        monkeypatch.setenv("RUNPOD_REST_URL", fake.url)
        fit_and_check_against_rank0("pods", tmp_path)  # RemoteStrategy(cluster="pods")
    finally:
        down = cli("down", "pods", env=env)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "torn down" in down.stdout
    assert pod_id in fake.terminated and fake.live_pods() == []
    assert not token_file.exists() and not os.path.exists(definition["state_dir"])
    assert "pods" not in json.loads((config / "clusters.json").read_text())
    fake.settle()
    assert not fake.runtime.alive(type("Gone", (), {"id": pod_id})())  # its container is gone too


@pytest.mark.timeout(300)
def test_up_instant_cluster_saves_the_cluster_id_and_down_deletes_the_cluster(fake, tmp_path):
    from tests.fakes.runpod_api import machine_address

    if machine_address() is None:
        pytest.skip("this machine has no non-loopback address for the cluster's private network")
    config = tmp_path / "config"
    env = _env(fake, str(config))
    up = cli("up", "runpod", "--gpu", "RTX A4000", "--nodes", "2", "--instant-cluster", "--free-ports", "--yes",
             "--name", "ic", env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    assert "cluster 'ic' is up: 2 pod(s), 4 CPUs, 2 GPUs, $0.50/hour" in up.stdout
    definition = json.loads((config / "clusters.json").read_text())["ic"]
    cluster_id = definition["cluster_id"]
    assert definition["kind"] == "runpod" and cluster_id in fake.clusters  # kept after `up` exited
    assert definition["pod_ids"] == fake.clusters[cluster_id].pod_ids  # head (rank 0) first
    try:
        status = cli("status", "ic", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        row = next(line for line in status.stdout.splitlines() if line.startswith("ic"))
        assert " up " in row and "$0.50/h)" in row  # the meter reads both member pods
    finally:
        down = cli("down", "ic", env=env)
    assert down.returncode == 0, down.stderr[-3000:]
    assert fake.deleted_clusters[-1] == cluster_id and fake.live_clusters() == [] and fake.live_pods() == []
    assert "ic" not in json.loads((config / "clusters.json").read_text())
