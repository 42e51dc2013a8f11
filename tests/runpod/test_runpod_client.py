"""The RunPod REST v2 client against the fake server (which checks every request against RunPod's
OpenAPI document): pods, catalog, errors that say what to do, retries, and the key kept secret."""
from __future__ import annotations

import logging
import pickle
import time

import pytest
import requests

from gpu_proxy.clouds.runpod.client import CreateClusterRequest
from gpu_proxy.clouds.runpod import (CreatePodRequest, RunPodAuthError, RunPodCapacityError, RunPodClient, RunPodError,
                                     RunPodNotFoundError, RunPodRateLimitError, RunPodUnavailableError, estimate_cost,
                                     load_api_key, resolve_gpu)
from gpu_proxy.errors import ConfigurationError
from tests.fakes.runpod_api import FakeRunPod


@pytest.fixture(scope="module")
def fake():
    with FakeRunPod(provisioning_s=0.1, starting_s=0.1) as server:
        yield server
        # Whatever the tests did, the client never sent a request the contract forbids, and the fake never
        # answered outside it.
        assert server.violations == []


@pytest.fixture
def client(fake):
    sleeps: list[float] = []
    client = RunPodClient(fake.api_key, base_url=fake.url, timeout_s=5, max_retries=3, sleep=sleeps.append)
    client.sleeps = sleeps  # type: ignore[attr-defined]
    yield client
    for cluster in fake.live_clusters():
        client.delete_cluster(cluster.id)
    for pod in fake.live_pods():
        client.terminate_pod(pod.id)


def _wait_status(client: RunPodClient, pod_id: str, status: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get_pod(pod_id).status != status:
        assert time.monotonic() < deadline, f"pod never {status}"
        time.sleep(0.05)


def test_the_key_comes_from_the_argument_the_environment_or_runpods_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    config = tmp_path / "config.toml"
    config.write_text('[default]\napi_key = "from-file"\n[other]\napi_key = "other-key"\n')
    assert load_api_key(config_file=config) == "from-file"
    assert load_api_key(config_file=config, profile="other") == "other-key"
    monkeypatch.setenv("RUNPOD_API_KEY", "from-env")
    assert load_api_key(config_file=config) == "from-env"
    assert load_api_key("given", config_file=config) == "given"
    monkeypatch.delenv("RUNPOD_API_KEY")
    with pytest.raises(ConfigurationError, match="set RUNPOD_API_KEY"):
        load_api_key(config_file=tmp_path / "missing.toml")
    config.write_text('api_key = "secret-in-broken-file\n')
    with pytest.raises(ConfigurationError) as broken:
        load_api_key(config_file=config)
    assert "secret-in-broken-file" not in str(broken.value)


def test_the_base_url_comes_from_the_environment_and_must_be_https(fake, monkeypatch):
    monkeypatch.setenv("RUNPOD_REST_URL", fake.url)
    assert RunPodClient(fake.api_key).base_url == fake.url
    with pytest.raises(ConfigurationError, match="https"):
        RunPodClient(fake.api_key, base_url="http://api.example.com")


def test_a_pod_goes_through_its_life_cycle(client, fake):
    pod = client.create_pod(CreatePodRequest("gp-test-life", "img:1", "NVIDIA RTX A4000", 2, env={"ROLE": "head"}))
    assert pod.status == "PROVISIONING" and pod.gpu_count == 2 and pod.cost_per_hour == pytest.approx(0.5)
    assert pod.ssh_direct is None  # not published before the pod runs
    _wait_status(client, pod.id, "RUNNING")
    running = client.get_pod(pod.id)
    assert running.ssh_direct is not None and running.ssh_direct.username == "root"
    assert running.raw["env"] == {"ROLE": "head"}  # RunPod echoes a pod's env: no secret may go there
    assert [p.id for p in client.list_pods()] == [pod.id]
    assert client.find_pod("gp-test-life").id == pod.id
    stopped = client.stop_pod(pod.id)
    assert stopped.status == "EXITED" and stopped.cost_per_hour == 0.0
    client.terminate_pod(pod.id)
    client.terminate_pod(pod.id)  # already gone: fine
    with pytest.raises(RunPodNotFoundError):
        client.get_pod(pod.id)
    assert client.list_pods() == []


def test_catalog_names_resolve_and_unknown_ones_get_suggestions(client):
    gpus = client.gpu_types()
    assert resolve_gpu("h100 sxm", gpus).id == "NVIDIA H100 80GB HBM3"
    assert resolve_gpu("NVIDIA RTX A4000", gpus).id == "NVIDIA RTX A4000"
    assert resolve_gpu("4090", gpus).id == "NVIDIA GeForce RTX 4090"
    with pytest.raises(ConfigurationError) as ambiguous:
        resolve_gpu("H100", gpus)
    assert "NVIDIA H100 80GB HBM3" in str(ambiguous.value) and "NVIDIA H100 PCIe" in str(ambiguous.value)
    with pytest.raises(ConfigurationError) as unknown:
        resolve_gpu("NVIDIA A100 80GB PCI", gpus)
    assert "Did you mean" in str(unknown.value) and "'NVIDIA A100 80GB PCIe'" in str(unknown.value)
    with pytest.raises(ConfigurationError, match="offered on the secure cloud: pass cloud='SECURE'"):
        resolve_gpu("L40S", gpus, cloud="COMMUNITY")


def test_cost_estimates_multiply_gpu_price_by_gpus_nodes_and_hours(client):
    h100 = resolve_gpu("H100 SXM", client.gpu_types())
    estimate = estimate_cost(h100, gpus_per_node=8, nodes=2, hours=1.5)
    assert estimate.per_hour == pytest.approx(2.69 * 16) and estimate.total == pytest.approx(2.69 * 16 * 1.5)
    assert "$43.04/hour" in str(estimate)
    assert estimate_cost(h100, 1, 1, cloud="COMMUNITY").per_hour == pytest.approx(2.39)
    with pytest.raises(ConfigurationError, match="at most 8 GPUs"):
        estimate_cost(h100, gpus_per_node=9)


def test_no_capacity_says_where_the_gpus_are(client, fake):
    with pytest.raises(RunPodCapacityError) as here:
        client.create_pod(CreatePodRequest("gp-test-cap", "img:1", "NVIDIA RTX A4000", 4,
                                           data_center_ids=("CA-MTL-1",)))
    assert "US-TX-3" in str(here.value) and "EU-RO-1" in str(here.value)
    with pytest.raises(RunPodCapacityError) as nowhere:
        client.create_pod(CreatePodRequest("gp-test-cap", "img:1", "NVIDIA L40S", 4))
    message = str(nowhere.value)
    assert "not available in any data centre" in message and "NVIDIA RTX A4000" in message
    assert fake.live_pods() == []


def test_a_wrong_key_gets_a_401_that_points_at_the_key(fake):
    bad = RunPodClient("rpa_wrong_key_123", base_url=fake.url)
    with pytest.raises(RunPodAuthError) as refused:
        bad.list_pods()
    assert refused.value.status == 401 and "RUNPOD_API_KEY" in str(refused.value)
    assert "rpa_wrong_key_123" not in str(refused.value)


def test_429_is_retried_after_retry_after_seconds(client, fake):
    fake.fail_next(429, times=2, retry_after=7, path_prefix="/v2/pods")
    assert client.list_pods() == []
    assert client.sleeps == [7.0, 7.0]


def test_429_gives_up_after_the_retries(client, fake):
    fake.fail_next(429, times=10, retry_after=1, path_prefix="/v2/catalog")
    with pytest.raises(RunPodRateLimitError, match="after 4 attempts"):
        client.gpu_types()
    assert len(client.sleeps) == 3
    fake._injected.clear()


def test_5xx_is_retried_with_exponential_backoff(client, fake):
    fake.fail_next(503, times=2, path_prefix="/v2/catalog")
    assert client.data_centers()
    assert len(client.sleeps) == 2 and client.sleeps[1] > client.sleeps[0] * 1.0 - 1e-9
    fake.fail_next(500, times=10, path_prefix="/v2/catalog")
    with pytest.raises(RunPodUnavailableError, match="status.runpod.io"):
        client.data_centers()
    fake._injected.clear()


def test_a_create_that_timed_out_is_not_made_twice(fake):
    client = RunPodClient(fake.api_key, base_url=fake.url, timeout_s=0.5, sleep=lambda s: None)
    fake.slow_next(1.5, path_prefix="/v2/pods")  # RunPod creates the pod, the answer comes too late
    pod = client.create_pod(CreatePodRequest("gp-test-once", "img:1", "NVIDIA RTX A4000", 1))
    time.sleep(1.2)
    assert [p.name for p in fake.live_pods()] == ["gp-test-once"]
    assert pod.id == fake.live_pods()[0].id
    client.terminate_pod(pod.id)


def test_a_create_answered_503_is_looked_up_by_name_then_posted_again_once(client, fake):
    """The shared transport's rule for POSTs that create: after a 5xx RunPod may or may not have made the pod,
    so the client looks for it by name (none: the 503 came before anything was made) and posts again; a
    plain POST (a stop action) that got a 5xx is not repeated blindly by urllib3."""
    fake.fail_next(503, times=1, path_prefix="/v2/pods")
    before = len(fake.requests)
    pod = client.create_pod(CreatePodRequest("gp-test-503", "img:1", "NVIDIA RTX A4000", 1))
    calls = [(method, path.split("?")[0], status) for method, path, status in fake.requests[before:]]
    assert calls == [("POST", "/v2/pods", 503), ("GET", "/v2/pods", 200), ("POST", "/v2/pods", 201)]
    assert [p.name for p in fake.live_pods()] == ["gp-test-503"] and pod.name == "gp-test-503"
    assert len(client.sleeps) == 1  # one backoff, before the look-up
    fake.fail_next(429, times=1, retry_after=2, path_prefix="/v2/pods")
    before = len(fake.requests)
    second = client.create_pod(CreatePodRequest("gp-test-429", "img:1", "NVIDIA RTX A4000", 1))
    calls = [(method, status) for method, _, status in fake.requests[before:]]
    assert calls == [("POST", 429), ("POST", 201)]  # a 429 was not acted on: posted again, no look-up
    assert client.sleeps[-1] == 2.0
    client.terminate_pod(pod.id)
    client.terminate_pod(second.id)


def test_the_key_is_never_logged_shown_or_pickled(fake, caplog):
    caplog.set_level(logging.DEBUG)  # urllib3 and requests included
    client = RunPodClient(fake.api_key, base_url=fake.url, sleep=lambda s: None)
    fake.fail_next(429, times=1, retry_after=0)
    client.list_pods()
    errors = []
    for call in (lambda: RunPodClient(fake.api_key + "x", base_url=fake.url).list_pods(),
                 lambda: client.get_pod("nope"),
                 lambda: client.create_pod(CreatePodRequest("gp-test-key", "i", "NVIDIA L40S", 8))):
        with pytest.raises(Exception) as caught:
            call()
        errors.append(f"{caught.value!s} {caught.value!r}")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(client)
    for text in (caplog.text, repr(client), str(vars(client)), *errors):
        assert fake.api_key not in text


def test_the_fake_refuses_and_records_a_request_that_breaks_the_contract(fake):
    before = len(fake.violations)
    answer = requests.post(f"{fake.url}/v2/pods", json={"name": "x", "gpu": {"id": "y", "count": 0}, "bogus": 1},
                           headers={"Authorization": f"Bearer {fake.api_key}"}, timeout=10)
    assert answer.status_code == 422 and answer.json()["errors"]
    assert len(fake.violations) > before
    del fake.violations[before:]  # the module's final check is about the client's requests


# ---- Instant Clusters and billing ------------------------------------------------------------------------

def _wait_cluster_running(client: RunPodClient, cluster_id: str, timeout_s: float = 10) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        pods = client.cluster_pods(cluster_id)
        if pods and all(pod.status == "RUNNING" and pod.cluster_rank is not None for pod in pods):
            return pods
        assert time.monotonic() < deadline, "cluster never RUNNING"
        time.sleep(0.05)


def test_an_instant_cluster_is_created_read_and_deleted_as_a_whole(client, fake):
    cluster = client.create_cluster(CreateClusterRequest("gp-test-ic", "img:1", "NVIDIA RTX A4000", 2, 3,
                                                         env={"PUBLIC_KEY": "ssh-ed25519 AAAA x"}))
    assert (cluster.pod_count, cluster.gpus_per_pod, cluster.type, cluster.pods_total) == (3, 2, "TRAINING", 3)
    assert cluster.data_center_id == "US-TX-3"  # one data centre, with stock for all 3 x 2 GPUs
    early = client.cluster_pods(cluster.id)
    assert len(early) == 3 and all(pod.cluster_id == cluster.id for pod in early)
    pods = _wait_cluster_running(client, cluster.id)
    assert [pod.cluster_rank for pod in pods] == [0, 1, 2]  # rank order, the primary first
    assert all(pod.ssh_direct and pod.raw["env"] == {"PUBLIC_KEY": "ssh-ed25519 AAAA x"} for pod in pods)
    read = client.get_cluster(cluster.id)
    assert read.primary_pod_id == pods[0].id and read.pods_by_status == {"RUNNING": 3}
    assert read.primary_ssh == f"{pods[0].ssh_direct.host}:{pods[0].ssh_direct.port}"
    assert client.find_cluster("gp-test-ic").id == cluster.id and client.list_pods() == []  # members hidden
    assert len(client.list_pods(include_cluster_pods=True)) == 3
    with pytest.raises(RunPodError, match="delete the cluster instead") as refused:
        client.terminate_pod(pods[1].id)  # RunPod: members cannot be deleted through the pod endpoints
    assert refused.value.status == 409
    client.delete_cluster(cluster.id)
    client.delete_cluster(cluster.id)  # already gone: fine
    assert fake.live_pods() == [] and fake.live_clusters() == [] and set(fake.terminated) >= {p.id for p in pods}
    with pytest.raises(RunPodNotFoundError):
        client.get_cluster(cluster.id)
    assert client.list_clusters() == []


def test_a_cluster_create_that_timed_out_is_not_bought_twice(fake):
    client = RunPodClient(fake.api_key, base_url=fake.url, timeout_s=0.5, sleep=lambda s: None)
    before = len(fake.requests)
    fake.slow_next(1.5, path_prefix="/v2/clusters")  # RunPod makes the cluster, the answer comes too late
    cluster = client.create_cluster(CreateClusterRequest("gp-test-ic-once", "img:1", "NVIDIA RTX A4000", 1, 2))
    time.sleep(1.2)
    assert [c.name for c in fake.live_clusters()] == ["gp-test-ic-once"] and len(fake.live_pods()) == 2
    assert cluster.id == fake.live_clusters()[0].id
    assert [path for method, path, _ in fake.requests[before:] if method == "POST"] == ["/v2/clusters"]
    client.delete_cluster(cluster.id)
    assert fake.live_pods() == []


def test_a_cluster_without_capacity_says_where_the_gpus_are(client, fake):
    with pytest.raises(RunPodCapacityError) as refused:  # 2 x 4 A4000 fit nowhere in one data centre
        client.create_cluster(CreateClusterRequest("gp-test-ic-cap", "img:1", "NVIDIA RTX A4000", 4, 3))
    assert "no capacity" in str(refused.value) and "NVIDIA RTX A4000" in str(refused.value)
    assert fake.live_clusters() == [] and fake.live_pods() == []


def test_the_fake_refuses_a_cluster_request_outside_the_contract(fake):
    before = len(fake.violations)
    body = {"name": "x", "type": "TRAINING", "image": "i", "cloud": "SECURE",  # clusters have no cloud
            "compute": {"gpuTypeId": "NVIDIA RTX A4000", "gpuCountPerPod": 1, "podCount": 1}}  # and >= 2 pods
    answer = requests.post(f"{fake.url}/v2/clusters", json=body, headers={"Authorization": f"Bearer {fake.api_key}"},
                           timeout=10)
    assert answer.status_code == 422 and len(answer.json()["errors"]) >= 2
    assert fake.live_clusters() == []
    del fake.violations[before:]  # the module's final check is about the client's requests


def test_the_spend_summary_equals_what_runpod_billed(client, fake):
    from datetime import datetime, timezone

    began = datetime.now(timezone.utc)
    pod = client.create_pod(CreatePodRequest("gp-test-bill", "img:1", "NVIDIA RTX A4000", 2))  # $0.50/h
    cluster = client.create_cluster(CreateClusterRequest("gp-test-bill-ic", "img:1", "NVIDIA RTX A4000", 1, 2))
    _wait_cluster_running(client, cluster.id)
    time.sleep(0.5)
    client.stop_pod(pod.id)  # billing stops with the pod's compute
    time.sleep(0.3)
    stopped_bill = fake.billed_usd(pod_id=pod.id)
    client.terminate_pod(pod.id)
    client.delete_cluster(cluster.id)
    assert fake.billed_usd(pod_id=pod.id) == pytest.approx(stopped_bill)  # nothing billed while stopped
    pod_bill, cluster_bill = fake.billed_usd(pod_id=pod.id), fake.billed_usd(cluster_id=cluster.id)
    assert pod_bill > 0 and cluster_bill > 0
    summary = client.spend(began, pod_ids=[pod.id], cluster_ids=[cluster.id])
    assert summary.pods_usd == pytest.approx(pod_bill, abs=1e-5)  # the members bill as the cluster only
    assert summary.clusters_usd == pytest.approx(cluster_bill, abs=1e-5)
    assert set(summary.by_resource) == {pod.id, cluster.id} and "Instant Clusters $" in str(summary)
    assert summary.total_usd == pytest.approx(pod_bill + cluster_bill, abs=1e-5)
    everything = client.spend(began)  # every pod and cluster of the account in the window (RunPod snaps it out)
    assert everything.pods_usd >= summary.pods_usd - 1e-5 and everything.by_resource[cluster.id] == summary.clusters_usd
    only = client.spend(began, cluster_ids=[cluster.id], pod_ids=[])
    assert only.pods_usd == 0 and set(only.by_resource) == {cluster.id}
    report = client.cluster_billing(last_n=1, cluster_id=cluster.id)
    assert report.bucket_size == "hour" and report.start.endswith(":00:00Z") and report.end > report.start
    assert report.total_usd == pytest.approx(cluster_bill, abs=1e-5)
    assert {record.resource_id for record in report.records} == {cluster.id}
    with pytest.raises(ConfigurationError, match="not both"):
        client.pod_billing(start=began, last_n=2)
    with pytest.raises(ConfigurationError, match="bucket_size"):
        client.pod_billing(bucket_size="minute")


def test_an_idle_cluster_member_deletes_its_whole_cluster_with_its_pod_scoped_key(client, fake):
    """The node's idle watcher in an Instant Cluster (entrypoint.py): RunPod refuses to terminate a member
    pod, so the member reads its own pod with RunPod's pod-scoped key and deletes its cluster."""
    import sys

    sys.path.insert(0, "cluster_image")
    try:
        import entrypoint
    finally:
        sys.path.remove("cluster_image")
    cluster = client.create_cluster(CreateClusterRequest("gp-test-ic-idle", "img:1", "NVIDIA RTX A4000", 1, 2))
    worker = _wait_cluster_running(client, cluster.id)[1]
    member = fake.pods[worker.id]
    env = {"RUNPOD_POD_ID": worker.id, "RUNPOD_API_KEY": member.scoped_key, "RUNPOD_REST_URL": fake.url,
           **member.cluster_env}
    me = entrypoint._private_environment(env)
    assert isinstance(me, entrypoint.ClusterMemberSelf) and member.scoped_key not in repr(me)
    said: list[str] = []
    assert me.end(said.append) is True
    assert fake.cluster_deleted_by[cluster.id] == "pod key" and fake.live_pods() == []
    assert f"deleted its Instant Cluster {cluster.id}" in said[-1]
    other = client.create_cluster(CreateClusterRequest("gp-test-ic-other", "img:1", "NVIDIA RTX A4000", 1, 2))
    headers = {"Authorization": f"Bearer {member.scoped_key}"}  # a gone pod's key: nothing
    assert requests.delete(f"{fake.url}/v2/clusters/{other.id}", headers=headers, timeout=10).status_code == 401
    key = fake.pods[_wait_cluster_running(client, other.id)[0].id].scoped_key
    third = client.create_cluster(CreateClusterRequest("gp-test-ic-third", "img:1", "NVIDIA RTX A4000", 1, 2))
    assert requests.delete(f"{fake.url}/v2/clusters/{third.id}", headers={"Authorization": f"Bearer {key}"},
                           timeout=10).status_code == 403  # another cluster: refused
    assert {c.id for c in fake.live_clusters()} == {other.id, third.id}


def test_teardown_retries_through_the_one_transport_and_reports_what_it_could_not_end(client, fake):
    """terminate_instances has no retry loop of its own: a DELETE answered 503 is retried by the transport
    (with its backoff), and one that keeps failing is reported once, not retried 3 x 6 times."""
    from gpu_proxy.clouds.runpod.provision import terminate_instances

    pod = client.create_pod(CreatePodRequest("gp-test-teardown", "img:1", "NVIDIA RTX A4000", 1))
    fake.fail_next(503, times=2, path_prefix=f"/v2/pods/{pod.id}")
    before = len(fake.requests)
    assert terminate_instances(client, [pod.id]) == [] and pod.id in fake.terminated
    deletes = [status for method, _, status in fake.requests[before:] if method == "DELETE"]
    assert deletes == [503, 503, 200] or deletes == [503, 503, 204], deletes
    other = client.create_pod(CreatePodRequest("gp-test-teardown-2", "img:1", "NVIDIA RTX A4000", 1))
    fake.fail_next(500, times=50, path_prefix=f"/v2/pods/{other.id}")
    before = len(fake.requests)
    (failure,) = terminate_instances(client, [other.id])
    assert failure.startswith(f"{other.id}: ") and "status.runpod.io" in failure
    assert len([m for m, _, _ in fake.requests[before:] if m == "DELETE"]) == client.max_retries + 1
    fake._injected.clear()
    client.terminate_pod(other.id)


def test_a_pod_ending_itself_rides_out_an_outage_through_the_transport_alone(client, fake):
    """The node's self-end (node/pod_self.py) has no retry loop of its own: its client retries each call
    longer than home's, with the transport's backoff, and a pod already gone counts as ended."""
    from gpu_proxy.clouds.runpod.node.pod_self import SELF_END_RETRIES, PodSelf

    pod = client.create_pod(CreatePodRequest("gp-test-self-end", "img:1", "NVIDIA RTX A4000", 1))
    sleeps: list[float] = []
    me = PodSelf(pod.id, fake.pods[pod.id].scoped_key, fake.url, sleep=sleeps.append)
    fake.fail_next(503, times=SELF_END_RETRIES, retry_after=None, path_prefix=f"/v2/pods/{pod.id}")
    said: list[str] = []
    assert me.end(said.append) is True and fake.terminated_by[pod.id] == "pod key"
    assert len(sleeps) == SELF_END_RETRIES and sleeps[-1] > sleeps[0], sleeps  # 8 waits, growing
    assert said == [f"pod {pod.id} terminated itself"]
