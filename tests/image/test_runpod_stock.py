"""RunPod with no image of your own: pods start from a stock PyTorch image (the fake's stand-in: sshd
and a fresh venv without gpu-proxy, see tests/fakes/stock_image.py) and home installs its own
versions there over SSH, then starts the node with the same code the node image runs."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from gpu_proxy.clouds.runpod import LaunchError, RunPodClient, RunPodCluster
from gpu_proxy.clouds.runpod.models import CreatePodRequest, Template
from gpu_proxy.clouds.runpod.node_install import BootstrapError, NodeBootstrap, install_plan
from gpu_proxy.clouds.runpod.stock_images import STOCK_PYTORCH, choose_stock_image
from gpu_proxy.versions import VersionSkewError, check_same_versions, home_versions
from gpu_proxy.clusters.ray_node import RayPorts
from gpu_proxy.errors import ConfigurationError
from gpu_proxy.ssh import SSHTarget
from tests.fakes.runpod_api import EntrypointRuntime, FakeRunPod, default_templates
from tests.fakes.stock_image import ImageRuntimes, StockImageRuntime
from tests.support.processes import processes_mentioning
from tests.support.sshd import generate_client_key, sshd_missing_reason

STOCK = STOCK_PYTORCH["2.8"]


def _templates(raw: list[dict]) -> list[Template]:
    return [Template.from_json(item) for item in raw]


# ---- the stock image table, checked against the catalog ------------------------------------------------

def test_the_stock_image_for_home_torch_is_one_the_catalog_lists():
    catalog = _templates(default_templates())
    assert choose_stock_image("2.8.0+cu128", catalog) == STOCK
    assert choose_stock_image("2.13.0", catalog) == STOCK  # newer than every entry: the newest, torch installed over
    assert choose_stock_image(None, catalog) == STOCK
    # Our entry gone from RunPod's catalog: the newest runpod/pytorch image it lists, never a serverless one.
    older = [t for t in catalog if t.image != STOCK]
    assert choose_stock_image("2.8.0", older) == "runpod/pytorch:2.1.0-py3.10-cuda11.8.0-devel-ubuntu22.04"
    with pytest.raises(ConfigurationError, match="image="):
        choose_stock_image("2.8.0", [t for t in catalog if t.serverless])
    # The torch 2.8 entry is the image RunPod's OpenAPI document gives as its example (the others come
    # from runpod/containers' official-templates/pytorch; tests/image/test_runpod_stock_units.py).
    document = (Path(__file__).parents[1] / "fakes" / "runpod-openapi-v2.json").read_text()
    assert STOCK in document


def test_version_skew_fails_with_both_lists():
    home = {"python": "3.11", "gpu-proxy": "0.1.0", "ray": "2.60.0", "torch": "2.13.0+cpu"}
    check_same_versions(home, {**home, "torch": "2.13.0+cu128"}, "node 1/1")  # the CUDA build tag is no skew
    with pytest.raises(VersionSkewError) as skew:
        check_same_versions(home, {**home, "ray": "2.59.0", "python": "3.12"}, "RunPod node 2/2")
    text = str(skew.value)
    assert "ray 2.59.0" in text and "ray 2.60.0" in text and "python 3.12" in text and "python 3.11" in text
    assert "home:" in text and "RunPod node 2/2:" in text


# ---- the stand-in pods, for real -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime():
    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    runtime = ImageRuntimes(EntrypointRuntime(num_cpus=1), StockImageRuntime(num_cpus=1))
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def fake(runtime):
    with FakeRunPod(runtime) as server:
        yield server
        assert server.violations == []


def _cluster(fake: FakeRunPod, lines: list[str], **options) -> RunPodCluster:
    settings = dict(gpu="RTX A4000", gpus_per_node=1, api_key=fake.api_key, base_url=fake.url,
                    ray_ports=RayPorts.free_on_this_machine(), worker_ray_ports=RayPorts.free_on_this_machine(),
                    launch_timeout_s=60, ssh_timeout_s=60, ray_timeout_s=120, progress=lines.append)
    settings.update(options)
    return RunPodCluster(**settings)


@pytest.mark.timeout(400)
def test_two_pods_with_no_image_are_bootstrapped_into_one_ray_cluster(fake, runtime, monkeypatch):
    monkeypatch.delenv("GPU_PROXY_RUNPOD_IMAGE", raising=False)
    lines: list[str] = []
    cluster = _cluster(fake, lines, nodes=2)
    with cluster:
        assert cluster.resources()["GPU"] == 2.0
        pods = [fake.pods[pod_id] for pod_id in cluster.pod_ids]
        assert {pod.image for pod in pods} == {STOCK}
        for pod in pods:  # gpu-proxy really was pip-installed into each pod's own Python
            venv = runtime.stock.venv_of(pod.id)
            assert list(venv.glob("lib/python*/site-packages/gpu_proxy-*.dist-info")), venv
        text = "\n".join(lines)
        version = home_versions()["gpu-proxy"]
        for stage in (f"no image given: pods start from RunPod's {STOCK}", f"node 1/2: installing gpu-proxy {version}",
                      f"node 2/2: installing gpu-proxy {version}", "node 1/2: starting the Ray head",
                      "node 2/2: starting the Ray worker", "all 2 node(s) and 2 GPU(s) joined"):
            assert stage in text, stage
        print(f"\nbootstrap of 2 cold stand-in pods: {cluster.bootstrap_s:.1f} s")
        folders = [str(runtime.stock.folder / pod.id) for pod in pods]
    assert all(pod.id in fake.terminated for pod in pods)
    fake.settle()
    time.sleep(1)
    assert all(processes_mentioning(folder) == [] for folder in folders)


@pytest.mark.timeout(300)
def test_an_instant_cluster_with_no_image_is_bootstrapped_and_deleted_as_a_whole(fake, monkeypatch):
    """Rank and addresses, which a stock image's ssh sessions do not get from the container, come from
    RunPod's API (the members' rank and cluster IP); rank 0 becomes the head."""
    from tests.fakes.runpod_api import machine_address

    if machine_address() is None:
        pytest.skip("this machine has no non-loopback address for the cluster's private network")
    monkeypatch.delenv("GPU_PROXY_RUNPOD_IMAGE", raising=False)
    lines: list[str] = []
    cluster = _cluster(fake, lines, nodes=2, instant_cluster=True)
    with cluster:
        assert cluster.resources()["GPU"] == 2.0
        assert {fake.pods[pod_id].image for pod_id in cluster.pod_ids} == {STOCK}
        cluster_id = cluster.cluster_id
        assert "node 2/2: starting the Ray worker" in "\n".join(lines)
    assert cluster_id in fake.deleted_clusters


@pytest.mark.timeout(240)
def test_a_failed_install_shows_pips_error_and_terminates_the_pods(fake, monkeypatch):
    monkeypatch.delenv("GPU_PROXY_RUNPOD_IMAGE", raising=False)
    lines: list[str] = []
    cluster = _cluster(fake, lines, requirements=["gpu-proxy-no-such-package==9.9"], pip_options=["--no-index"])
    with pytest.raises(BootstrapError) as failed:
        cluster.start()
    text = str(failed.value)
    assert "node 1/1" in text and "gpu-proxy-no-such-package" in text and "No matching distribution" in text
    assert cluster.pod_ids == [] and not [p for p in fake.live_pods() if p.name.startswith(cluster.name)]
    assert isinstance(failed.value, LaunchError)


@pytest.mark.timeout(240)
def test_a_node_that_exits_after_the_install_is_reported_with_its_log(fake, runtime, monkeypatch):
    """A stock pod outlives the node started in it (the image's sshd keeps it up): the launch asks the
    node, and fails with the node's own words instead of a bare timeout; the pod is terminated."""
    monkeypatch.delenv("GPU_PROXY_RUNPOD_IMAGE", raising=False)
    monkeypatch.setattr(runtime.stock, "extra_env", {"NUM_GPUS": "two"})
    lines: list[str] = []
    cluster = _cluster(fake, lines, ray_timeout_s=300)
    started = time.monotonic()
    with pytest.raises(LaunchError) as failed:
        cluster.start()
    assert time.monotonic() - started < 150, "the node's exit ends the wait for its dashboard, not the timeout"
    text = str(failed.value)
    assert "node 1/1 exited" in text and "NUM_GPUS='two' must be a whole number" in text
    assert cluster.pod_ids == [] and not [p for p in fake.live_pods() if p.name.startswith(cluster.name)]


@pytest.mark.timeout(240)
def test_a_warm_pod_skips_the_install_and_a_skewed_one_is_refused(fake, tmp_path):
    """The same pod bootstrapped twice: the second finds home's versions (the install's record in the pod's
    Python prefix) and installs nothing. Cold and warm times are printed (the figures in the report)."""
    key, public_key = generate_client_key(str(tmp_path))
    client = RunPodClient(fake.api_key, base_url=fake.url)
    pod = client.create_pod(CreatePodRequest("gp-test-warm", STOCK, "NVIDIA RTX A4000", 1,
                                             env={"PUBLIC_KEY": public_key}))
    try:
        deadline = time.monotonic() + 60
        while (pod := client.get_pod(pod.id)).status != "RUNNING" or pod.ssh_direct is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        target = SSHTarget(pod.ssh_direct.host, user=pod.ssh_direct.username, port=pod.ssh_direct.port,
                           identity_file=str(key), known_hosts_file=str(tmp_path / "known_hosts"),
                           host_key_policy="accept-new")
        plan = install_plan()
        lines: list[str] = []
        times = []
        for _ in range(2):
            node = NodeBootstrap(target, plan, "node 1/1", lines.append)
            started = time.monotonic()
            versions = node.install()
            node.check(versions)
            times.append(time.monotonic() - started)
        assert "installing gpu-proxy" in lines[0] and "skipping the install" in lines[-1]
        assert times[1] < times[0]
        print(f"\nbootstrap of one stand-in pod: cold {times[0]:.1f} s, warm {times[1]:.1f} s")
        # The node's real versions, probed over SSH, against a home with another Ray: refused, both named.
        assert versions["ray"] == plan.home["ray"]
        with pytest.raises(VersionSkewError) as skew:
            check_same_versions({**plan.home, "ray": "2.59.0"}, node.probe(), "RunPod node 1/1")
        assert f"ray {plan.home['ray']}" in str(skew.value) and "ray 2.59.0" in str(skew.value)
    finally:
        client.terminate_pod(pod.id)


@pytest.mark.timeout(300)
def test_up_runpod_with_only_the_api_key_reaches_ray_and_down_ends_it(fake, runtime, tmp_path, monkeypatch):
    """`gpu-proxy up runpod --gpu ...` with RUNPOD_API_KEY and no image: a running Ray cluster, then `down`.
    The pod's stack lacks fsspec (a dependency of gpu-proxy, whose wheel goes in with --no-deps) and the
    extras asked for: pip really installs them, from this machine's package index, at the pinned versions."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GPU_PROXY_RUNPOD_IMAGE"}
    env.update(GPU_PROXY_CONFIG_DIR=str(tmp_path / "config"), RUNPOD_API_KEY=fake.api_key, RUNPOD_REST_URL=fake.url)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpu_proxy.cli", *args], capture_output=True, text=True,
                              env=env, timeout=240, stdin=subprocess.DEVNULL)

    from importlib import metadata

    # Extras that are in neither the test environment nor the stand-in's stack (small, pure Python).
    monkeypatch.setattr(runtime.stock, "hidden", ("fsspec",))
    fsspec = metadata.version("fsspec")
    (tmp_path / "requirements.txt").write_text("# the project's extras\nappdirs==1.4.4  # pinned\n")
    up = cli("up", "runpod", "--gpu", "RTX A4000", "--free-ports", "--yes", "--name", "stock",
             "--requirements", str(tmp_path / "requirements.txt"), "--pip", "asteval==1.0.10")
    assert up.returncode == 0, up.stderr[-3000:]
    assert "node 1/1: installing gpu-proxy" in up.stderr and "cluster 'stock' is up: 1 pod(s)" in up.stdout
    (pod_id,) = json.loads((tmp_path / "config" / "clusters.json").read_text())["stock"]["pod_ids"]
    assert fake.pods[pod_id].image == STOCK
    # What pip installed into the pod's own Python: --requirements, --pip, and the dependency pin.
    (site,) = runtime.stock.venv_of(pod_id).glob("lib/python*/site-packages")
    for dist in ("appdirs-1.4.4", "asteval-1.0.10", f"fsspec-{fsspec}"):
        assert (site / f"{dist}.dist-info").is_dir(), (dist, sorted(p.name for p in site.iterdir()))
    down = cli("down", "stock")
    assert down.returncode == 0, down.stderr[-3000:]
    assert pod_id in fake.terminated
    # With an image, the pods install nothing: the extras are refused before anything is read from RunPod.
    before = len(fake.requests)
    refused = cli("up", "runpod", "--gpu", "RTX A4000", "--image", "ghcr.io/you/node:1", "--pip", "einops", "--yes",
                  "--name", "refused")
    assert refused.returncode == 1 and "put them in the image" in refused.stderr and fake.requests[before:] == []
