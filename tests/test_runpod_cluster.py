"""RunPodCluster end to end against the fake RunPod API, whose pods are local processes running the
real node entrypoint: a real Ray cluster, reached over a real sshd through an SSH tunnel."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy.clouds.runpod import LaunchError, RunPodCluster
from gpu_proxy.clusters.ray_node import RayPorts
from gpu_proxy.errors import ConfigurationError
from tests.fakes.runpod_api import EntrypointRuntime, FakeRunPod
from tests.lightning_project.models import fit_and_check_against_rank0
from tests.support.processes import processes_mentioning
from tests.support.sshd import sshd_missing_reason

IMAGE = "registry.example.com/gpu-proxy-node:test"


def _cluster(fake: FakeRunPod, lines: list[str] | None = None, **options) -> RunPodCluster:
    settings = dict(gpu="RTX A4000", gpus_per_node=2, image=IMAGE, api_key=fake.api_key, base_url=fake.url,
                    ray_ports=RayPorts.free_on_this_machine(), launch_timeout_s=60, ssh_timeout_s=60,
                    ray_timeout_s=120, progress=(lines.append if lines is not None else None))
    settings.update(options)
    return RunPodCluster(**settings)


@pytest.fixture(scope="module")
def runtime():
    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    runtime = EntrypointRuntime(num_cpus=2)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def fake(runtime):
    with FakeRunPod(runtime) as server:
        yield server
        assert server.violations == []


@pytest.mark.parametrize("options, words", [
    (dict(gpu="RTX A400O"), ["Did you mean", "NVIDIA RTX A4000"]),
    (dict(gpu="H100"), ["matches several", "NVIDIA H100 PCIe"]),
    (dict(gpus_per_node=9), ["at most 8 GPUs"]),
    (dict(budget_usd=1.0, expected_hours=3.0), ["above budget_usd=1"]),
])
def test_bad_input_is_refused_before_any_pod_is_created(fake, options, words):
    before = len(fake.requests)
    with pytest.raises(ConfigurationError) as refused:
        _cluster(fake, **options).start()
    for word in words:
        assert word in str(refused.value)
    assert not any(method == "POST" for method, _, _ in fake.requests[before:])


@pytest.mark.parametrize("options, words", [
    (dict(nodes=2), ["not supported yet", "gpus_per_node=8"]),
    (dict(idle_timeout="10m"), ["idle_timeout is not implemented"]),
    (dict(image=None), ["No node image", "GPU_PROXY_RUNPOD_IMAGE"]),
    (dict(budget_usd=-5), ["positive"]),
    (dict(data_centers="US-TX-3"), ["pass a list"]),
])
def test_arguments_that_cannot_work_are_refused_at_once(fake, options, words, monkeypatch):
    monkeypatch.delenv("GPU_PROXY_RUNPOD_IMAGE", raising=False)
    before = len(fake.requests)
    with pytest.raises(ConfigurationError) as refused:
        _cluster(fake, **options)
    for word in words:
        assert word in str(refused.value)
    assert fake.requests[before:] == []


@pytest.fixture(scope="module")
def cluster(fake):
    lines: list[str] = []
    cluster = _cluster(fake, lines)
    cluster.start()
    cluster.lines = lines  # type: ignore[attr-defined]
    yield cluster
    cluster.stop()


@pytest.mark.timeout(240)
def test_a_single_pod_becomes_a_ray_cluster_with_its_gpus(cluster, fake):
    assert cluster.resources()["GPU"] == 2.0 and cluster.resources()["CPU"] == 2.0
    text = "\n".join(cluster.lines)
    for stage in ("estimated cost: 1 x 2 x NVIDIA RTX A4000", "RUNNING", "waiting for SSH", "Ray token delivered",
                  "all 1 node(s) and 2 GPU(s) joined"):
        assert stage in text
    (pod,) = fake.live_pods()
    assert pod.ports == ["22/tcp"]  # only SSH is exposed
    assert pod.env["PUBLIC_KEY"].startswith("ssh-ed25519 ")
    token = cluster.endpoint().token
    for value in pod.env.values():  # RunPod echoes env back: no secret there
        assert token not in value and fake.api_key not in value
    assert token not in repr(cluster) and fake.api_key not in repr(cluster)
    with pytest.raises(TypeError, match="cannot be pickled"):
        __import__("pickle").dumps(cluster)


def test_the_tunnelled_dashboard_needs_the_token(cluster):
    endpoint = cluster.endpoint()
    assert endpoint.dashboard_url.startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(endpoint.dashboard_url + "/api/version", timeout=10)
    assert refused.value.code == 401
    with urllib.request.urlopen(urllib.request.Request(endpoint.dashboard_url + "/api/version",
                                                       headers=endpoint.headers()), timeout=10) as answer:
        assert answer.status == 200


@pytest.mark.timeout(300)
def test_lightning_fits_on_the_runpod_cluster(cluster, tmp_path):
    fit_and_check_against_rank0(cluster, tmp_path)


@pytest.mark.timeout(240)
def test_stop_terminates_every_pod_and_leaves_no_process(fake, runtime):
    cluster = _cluster(fake)
    with cluster:
        (pod_id,) = cluster.pod_ids
        folder = f"{runtime.folder}/{pod_id}"
        assert len(processes_mentioning(folder)) >= 1  # the pod's sshd
        ray_temp = fake.pods[pod_id].env["RAY_TEMP_DIR"]
        assert len(processes_mentioning(ray_temp)) >= 2  # raylet, GCS...
        local_port = cluster._tunnel_box[0].local_port
    assert pod_id in fake.terminated and pod_id not in fake.pods
    fake.settle()
    assert processes_mentioning(folder) == [] and processes_mentioning(ray_temp) == []
    assert processes_mentioning(f"127.0.0.1:{local_port}:") == []
    with pytest.raises(Exception, match="not started"):
        cluster.endpoint()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("broken, words", [
    ({"SSHD_BIN": "/nonexistent/sshd"}, ["EXITED"]),  # the container exits at once: no SSH ever
    ({"RAY_BIN": "/bin/false"}, ["Ray head did not come up"]),  # SSH works, token delivered, Ray never starts
])
def test_a_launch_failing_half_way_leaves_zero_pods(fake, broken, words):
    runtime = fake.runtime
    saved = dict(runtime.extra_env)
    runtime.extra_env.update(broken)
    lines: list[str] = []
    before = set(fake.terminated)
    try:
        cluster = _cluster(fake, lines, ssh_timeout_s=20, ray_timeout_s=20)
        with pytest.raises(LaunchError) as failed:
            cluster.start()
    finally:
        runtime.extra_env.clear()
        runtime.extra_env.update(saved)
    message = str(failed.value)
    assert all(word in message for word in words), message
    assert fake.live_pods() == [] or all(p.id not in cluster.pod_ids for p in fake.live_pods())
    assert len(set(fake.terminated) - before) == 1 and cluster.pod_ids == []
    assert "terminated pod(s)" in "\n".join(lines)


@pytest.mark.timeout(240)
def test_the_budget_terminates_the_pods_when_the_spend_reaches_it(fake):
    gpu = next(g for g in fake.gpus if g.id == "NVIDIA RTX A4000")
    price = gpu.price_secure
    gpu.price_secure = 1800.0  # $1/s for two GPUs: the budget is reached within seconds
    lines: list[str] = []
    try:
        cluster = _cluster(fake, lines, budget_usd=12.0, meter_interval_s=0.5)
        cluster.start()
        (pod_id,) = cluster.pod_ids
        import time

        deadline = time.monotonic() + 60
        while not cluster.budget_exceeded:
            assert time.monotonic() < deadline, "the budget never stopped the cluster"
            time.sleep(0.2)
        assert cluster.spent_usd() >= 12.0
        deadline = time.monotonic() + 30
        while pod_id in fake.pods and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pod_id in fake.terminated and pod_id not in fake.pods
        assert any("budget reached" in line for line in lines)
        with pytest.raises(Exception, match="budget_usd"):
            cluster.endpoint()
    finally:
        gpu.price_secure = price
        cluster.stop(raise_errors=False)
