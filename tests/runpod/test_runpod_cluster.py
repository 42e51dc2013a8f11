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
from gpu_proxy.runs.home import values
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
    (dict(nodes=1, instant_cluster=True), ["needs nodes >= 2"]),
    (dict(nodes=2, instant_cluster=True, cloud="COMMUNITY"), ["secure cloud only"]),
    (dict(idle_timeout="soon"), ["positive duration", "10m"]),
    (dict(idle_timeout=0), ["positive duration"]),
    (dict(requirements=["einops"]), ["stock image", "put them in the image"]),
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


def test_the_meter_adds_cost_events_to_each_active_run(cluster):
    from gpu_proxy import events
    from gpu_proxy.runs.control import RunControl

    seen: list = []
    control = RunControl(seen.append, "metered")
    with cluster.running(control):
        cluster._meter.tick()
        cluster._meter.tick()
    control.finish()
    assert list(control.items()) == []  # events go to on_event
    costs = [event.data for event in seen if event.kind == events.COST]
    assert len(costs) == 2 and costs[0]["usd_per_hour"] == pytest.approx(0.5)  # 2 x RTX A4000 at $0.25
    assert 0 < costs[0]["spent_usd"] <= costs[1]["spent_usd"] and costs[1]["budget_usd"] is None
    assert cluster.cost()["spent_usd"] >= costs[1]["spent_usd"] - 1e-6


@pytest.mark.timeout(300)
def test_the_budget_stops_the_run_with_a_checkpoint_then_terminates_the_pods(fake, tmp_path):
    """The spend nears the budget mid-run: the run stops at a step boundary and commits a checkpoint,
    home raises RunStoppedError, and only then are the pods terminated."""
    import threading
    import time

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gpu_proxy import RunStoppedError
    from gpu_proxy.storage import list_committed
    from gpu_proxy_lightning import RemoteStrategy
    from tests.lightning_project.models import DigitsData
    from tests.lightning.test_lightning_live_events import Endless, TimedLogger

    lines: list[str] = []
    cluster = _cluster(fake, lines, budget_usd=40.0, meter_interval_s=0.5, checkpoint_margin_s=1.0,
                       budget_grace_s=120)
    cluster.start()
    (pod_id,) = cluster.pod_ids
    states: dict = {}

    home = TimedLogger()

    def expensive_once_running() -> None:  # RunPod's price is what it is; the fake's can jump mid-run
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("cost_usd" not in m for _, m, _ in home.calls):
            time.sleep(0.1)  # until the workers train and log
        fake.pods[pod_id].price = 36000.0  # $10/s
        deadline = time.monotonic() + 120
        while cluster.active_runs() and time.monotonic() < deadline:  # the stop was requested, the run ends...
            states["pod_alive_while_run_active"] = pod_id in fake.pods
            time.sleep(0.05)

    watcher = threading.Thread(target=expensive_once_running, daemon=True)
    watcher.start()
    strategy = RemoteStrategy(cluster=cluster, checkpoint_dir=f"file://{tmp_path}/runs", run_name="budget",
                              home_loggers=[home])
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=1000, logger=False,
                        callbacks=[ModelCheckpoint(save_last=True)], enable_progress_bar=False,
                        enable_model_summary=False)
    try:
        with pytest.raises(RunStoppedError) as info:
            trainer.fit(Endless(), datamodule=DigitsData(limit=200))
        watcher.join(30)
        assert "budget_usd=40 reached" in str(info.value)
        assert trainer.state.status == "interrupted" and trainer.global_step > 0
        committed = list_committed(f"file://{tmp_path}/runs/budget/checkpoints")
        assert any(url.endswith("interrupted.ckpt") for url in committed)
        costs = [metrics["cost_usd"] for _, metrics, _ in home.calls if "cost_usd" in metrics]
        assert len(costs) >= 2 and costs == sorted(costs) and costs[-1] < 40.0
        assert states.get("pod_alive_while_run_active") is True  # pods outlived the run's checkpoint
        deadline = time.monotonic() + 60
        while pod_id in fake.pods and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pod_id in fake.terminated and pod_id not in fake.pods
        assert cluster.budget_exceeded and any("budget_usd=40 reached" in line for line in lines)
        with pytest.raises(Exception, match="budget_usd"):
            cluster.endpoint()
    finally:
        cluster.stop(raise_errors=False)


@pytest.mark.timeout(240)
def test_an_idle_cluster_ends_its_pods_with_their_own_pod_scoped_key(fake):
    """No run and no home heartbeat for idle_timeout: the head's idle watcher terminates its own pod through
    RunPod's API with the pod-scoped key RunPod injected (the user's key never reaches the pod)."""
    import time

    lines: list[str] = []
    cluster = _cluster(fake, lines, idle_timeout="6s")
    cluster.start()
    (pod_id,) = cluster.pod_ids
    try:
        pod = fake.pods[pod_id]
        assert pod.env["IDLE_TIMEOUT_S"] == "6" and fake.api_key not in repr(pod.env)
        time.sleep(8)  # home's heartbeat keeps it up past the timeout
        assert pod_id in fake.pods, fake.runtime.pod_log(pod_id)[-2000:]
        cluster.detach()  # home goes away, the pods stay (as after `gpu-proxy up`)
        deadline = time.monotonic() + 60
        while pod_id in fake.pods and time.monotonic() < deadline:
            time.sleep(0.5)
        assert fake.terminated_by.get(pod_id) == "pod key", fake.runtime.pod_log(pod_id)[-3000:]
    finally:
        cluster.stop(raise_errors=False)
        if pod_id in fake.pods:
            cluster.client.terminate_pod(pod_id)


def test_a_pod_scoped_key_acts_on_its_own_pod_only(fake):
    import requests

    from gpu_proxy.clouds.runpod import RunPodClient

    client = RunPodClient(fake.api_key, base_url=fake.url)
    first = client.create_pod(__import__("gpu_proxy.clouds.runpod", fromlist=["CreatePodRequest"]).CreatePodRequest(
        name="scoped-a", image=IMAGE, gpu_id="NVIDIA RTX A4000", env={"SSHD": "off", "ROLE": "head"}))
    second = client.create_pod(__import__("gpu_proxy.clouds.runpod", fromlist=["CreatePodRequest"]).CreatePodRequest(
        name="scoped-b", image=IMAGE, gpu_id="NVIDIA RTX A4000", env={"SSHD": "off", "ROLE": "head"}))
    try:
        key = fake.pods[first.id].scoped_key
        headers = {"Authorization": f"Bearer {key}"}
        assert requests.get(f"{fake.url}/v2/pods/{first.id}", headers=headers, timeout=10).status_code == 200
        assert requests.get(f"{fake.url}/v2/pods/{second.id}", headers=headers, timeout=10).status_code == 403
        assert requests.get(f"{fake.url}/v2/pods", headers=headers, timeout=10).status_code == 403
        assert requests.delete(f"{fake.url}/v2/pods/{second.id}", headers=headers, timeout=10).status_code == 403
        assert second.id in fake.pods
    finally:
        client.terminate_pod(first.id)
        client.terminate_pod(second.id)


@pytest.mark.timeout(300)
def test_two_pods_with_global_networking_form_one_ray_cluster_train_and_stop_leaves_nothing(fake, runtime,
                                                                                            tmp_path):
    """nodes=2: the worker pod joins the head at <headPodId>.runpod.internal (resolved through the fake's
    test-only seam to this machine's address); a fit runs one rank per node; stop terminates every pod and
    leaves no process (no sshd, no Ray daemon, no tunnel) and no endpoint."""
    import lightning as L

    from gpu_proxy.clusters.ray_node import alive_nodes
    from gpu_proxy_lightning import RemoteStrategy
    from tests.lightning_project.models import DigitsData, DigitsModel, RecordRanks, load_record

    from tests.fakes.runpod_api import machine_address

    if machine_address() is None:
        pytest.skip("this machine has no non-loopback address for the pods' private network")
    lines: list[str] = []
    head_ports = RayPorts.free_on_this_machine()
    cluster = _cluster(fake, lines, gpus_per_node=1, nodes=2, ray_ports=head_ports,
                       worker_ray_ports=RayPorts.free_on_this_machine())
    with cluster:
        head_id, worker_id = cluster.pod_ids
        head, worker = fake.pods[head_id], fake.pods[worker_id]
        folders = [f"{runtime.folder}/{pod_id}" for pod_id in (head_id, worker_id)]
        ray_temps = [head.env["RAY_TEMP_DIR"], worker.env["RAY_TEMP_DIR"]]
        assert all(len(processes_mentioning(folder)) >= 1 for folder in folders)  # each pod's sshd
        assert all(len(processes_mentioning(ray_temp)) >= 2 for ray_temp in ray_temps)  # raylet, GCS...
        local_port = cluster._tunnel_box[0].local_port
        assert head.global_networking and worker.global_networking and head.data_center == worker.data_center
        assert worker.env["HEAD_ADDRESS"] == f"{head_id}.runpod.internal:{head_ports.gcs}"
        assert head.env["PRIVATE_IP"] == worker.env["PRIVATE_IP"] == "auto" and "ROLE" in worker.env
        endpoint = cluster.endpoint()
        nodes = alive_nodes(endpoint.dashboard_url, endpoint.token)
        assert len(nodes) == 2 and {n["node_ip"] for n in nodes} == {machine_address()}
        assert cluster.resources()["GPU"] == 2.0
        assert "all 2 node(s) and 2 GPU(s) joined" in "\n".join(lines)
        # Two CPUs per worker: each pod has two, so the ranks land one per node (as GPUs would on RunPod).
        trainer = L.Trainer(strategy=RemoteStrategy(cluster=cluster, resources_per_worker={"CPU": 2}),
                            accelerator="cpu", devices=1, num_nodes=2,
                            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[RecordRanks(str(tmp_path))])
        trainer.fit(DigitsModel(), datamodule=DigitsData(limit=100))
        records = [load_record(tmp_path, "fit", rank) for rank in (0, 1)]
        assert [(r["num_nodes"], r["node_rank"]) for r in records] == [(2, 0), (2, 1)]
    assert {head_id, worker_id} <= set(fake.terminated)
    assert not any(pod.id in (head_id, worker_id) for pod in fake.live_pods())
    fake.settle()
    assert all(processes_mentioning(folder) == [] for folder in folders + ray_temps)
    assert processes_mentioning(f"127.0.0.1:{local_port}:") == []
    with pytest.raises(Exception, match="not started"):
        cluster.endpoint()


@pytest.mark.timeout(240)
def test_an_instant_cluster_of_two_nodes_is_one_ray_cluster_runs_and_is_deleted_as_a_whole(fake, runtime):
    """instant_cluster=True: one POST /v2/clusters; RunPod's NODE_RANK/MASTER_ADDR make rank 0 the head and
    the other node join it (overlay addresses stand for this machine through the fake's test-only seam);
    only 22/tcp, the token over SSH; the meter counts both pods; a run places one rank per node; stop
    deletes the cluster (zero pods, zero clusters, zero processes); RunPod's billing equals what it billed."""
    from datetime import datetime, timezone

    from gpu_proxy import events, shipping
    from gpu_proxy.clusters.ray_node import alive_nodes
    from gpu_proxy.runs import RunSpec
    from gpu_proxy.runs.control import RunControl
    from tests.fakes.runpod_api import machine_address

    if machine_address() is None:
        pytest.skip("this machine has no non-loopback address for the cluster's private network")
    lines: list[str] = []
    began = datetime.now(timezone.utc)
    before = len(fake.requests)
    cluster = _cluster(fake, lines, gpus_per_node=1, nodes=2, instant_cluster=True,
                       worker_ray_ports=RayPorts.free_on_this_machine())
    with cluster:
        cluster_id = cluster.cluster_id
        head_id, worker_id = cluster.pod_ids
        assert fake.clusters[cluster_id].pod_ids == [head_id, worker_id]  # rank order: the head is rank 0
        posts = [path for method, path, _ in fake.requests[before:] if method == "POST"]
        assert posts == ["/v2/clusters"] and fake.start_ssh_flags[-1] is False  # our own key, not the account's
        head, worker = fake.pods[head_id], fake.pods[worker_id]
        assert head.env == worker.env and "ROLE" not in head.env and "HEAD_ADDRESS" not in head.env
        assert head.ports == worker.ports == ["22/tcp"] and head.env["PUBLIC_KEY"].startswith("ssh-ed25519 ")
        assert worker.cluster_env["MASTER_ADDR"] == head.cluster_env["NODE_ADDR"] != worker.cluster_env["NODE_ADDR"]
        token = cluster.endpoint().token
        for value in head.env.values():  # RunPod echoes env back: no secret there
            assert token not in value and fake.api_key not in value
        endpoint = cluster.endpoint()
        assert len(alive_nodes(endpoint.dashboard_url, endpoint.token)) == 2 and cluster.resources()["GPU"] == 2.0
        text = "\n".join(lines)
        for stage in (f"Instant Cluster {cluster_id} created", "rank 1", "Ray token delivered",
                      "all 2 node(s) and 2 GPU(s) joined"):
            assert stage in text, text
        assert cluster.cost_per_hour() == pytest.approx(0.5)  # the meter reads both pods: 2 x 1 x $0.25

        def where(ctx):
            import os
            return {"rank": ctx.rank, "pod_rank": os.environ.get("NODE_RANK"), "nccl": os.environ.get(
                "NCCL_SOCKET_IFNAME"), "key": "RUNPOD_API_KEY" in os.environ}

        seen: list = []
        spec = RunSpec(shipping.dumps(where), num_workers=2, resources_per_worker={"CPU": 2})  # one per node
        control = RunControl(seen.append, spec.name)
        with cluster.running(control):
            cluster._meter.tick()
            outcomes = cluster.execute(spec, control)
        control.finish()
        ranks = sorted(values(outcomes), key=lambda v: v["rank"])
        assert sorted(v["pod_rank"] for v in ranks) == ["0", "1"]  # each rank ran on its own pod
        assert all(v["nccl"] == "ens" and v["key"] is False for v in ranks)
        cost = next(event.data for event in seen if event.kind == events.COST)
        assert cost["usd_per_hour"] == pytest.approx(0.5)
        folders = [f"{runtime.folder}/{pod_id}" for pod_id in (head_id, worker_id)]
        assert all(processes_mentioning(folder) for folder in folders)
    assert fake.deleted_clusters[-1] == cluster_id and fake.cluster_deleted_by[cluster_id] == "account key"
    assert cluster_id not in fake.clusters and {head_id, worker_id} <= set(fake.terminated)
    assert not any(pod.cluster_id == cluster_id for pod in fake.live_pods())
    assert not any(method == "DELETE" and path.startswith("/v2/pods/") for method, path, _ in fake.requests[before:])
    assert f"deleted Instant Cluster {cluster_id}" in "\n".join(lines) and cluster.cluster_id is None
    fake.settle()
    assert all(processes_mentioning(folder) == [] for folder in folders)
    billed = fake.billed_usd(cluster_id=cluster_id)
    spend = cluster.client.spend(began, cluster_ids=[cluster_id], pod_ids=[])
    assert billed > 0 and spend.clusters_usd == pytest.approx(billed, abs=1e-5) and spend.pods_usd == 0
    assert spend.total_usd == pytest.approx(billed, abs=1e-5) and set(spend.by_resource) == {cluster_id}


@pytest.mark.timeout(120)
def test_an_instant_cluster_failing_to_start_is_deleted(fake):
    """A member's container exits at once (no sshd): the wait fails fast and the whole cluster is deleted."""
    from tests.fakes.runpod_api import machine_address

    if machine_address() is None:
        pytest.skip("this machine has no non-loopback address for the cluster's private network")
    runtime = fake.runtime
    saved = dict(runtime.extra_env)
    runtime.extra_env.update({"SSHD_BIN": "/nonexistent/sshd"})
    lines: list[str] = []
    try:
        cluster = _cluster(fake, lines, gpus_per_node=1, nodes=2, instant_cluster=True, ssh_timeout_s=20)
        with pytest.raises(LaunchError, match="EXITED") as failed:
            cluster.start()
    finally:
        runtime.extra_env.clear()
        runtime.extra_env.update(saved)
    assert "Instant Cluster" in str(failed.value)
    (cluster_id,) = [line.split()[2] for line in lines if line.startswith("Instant Cluster ")]
    assert fake.deleted_clusters[-1] == cluster_id and cluster_id not in fake.clusters
    assert not any(pod.cluster_id == cluster_id for pod in fake.live_pods()) and cluster.pod_ids == []
    assert f"deleted Instant Cluster {cluster_id}" in "\n".join(lines)


def test_an_instant_cluster_whose_create_answer_never_came_is_found_and_deleted(fake):
    """Every attempt at POST /v2/clusters timed out, yet RunPod made the cluster: the launch fails, and the
    cluster is found by its unique name and deleted rather than left billing."""
    import time

    from gpu_proxy.clouds.runpod import RunPodClient, RunPodUnavailableError

    lines: list[str] = []
    cluster = _cluster(fake, lines, gpus_per_node=1, nodes=2, instant_cluster=True)
    cluster._client = RunPodClient(fake.api_key, base_url=fake.url, timeout_s=0.5, max_retries=0)
    fake.slow_next(1.5, path_prefix="/v2/clusters")
    with pytest.raises(RunPodUnavailableError):
        cluster.start()
    time.sleep(1.2)  # the slow answer is sent (and ignored)
    assert [c for c in fake.live_clusters() if c.name == cluster.name] == []
    deleted = [line for line in lines if line.startswith("deleted Instant Cluster ")]
    assert len(deleted) == 1 and deleted[0].split()[3] in fake.deleted_clusters
