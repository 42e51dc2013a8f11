"""SSHCluster against a real sshd on loopback: this machine plays the head and a worker."""
from __future__ import annotations

import os
import pickle
import time
import urllib.error
import urllib.request

import pytest

from gpu_proxy.clusters.base import Cluster
from gpu_proxy.clusters.ray_node import RayPorts, default_ray_executable
from gpu_proxy.clusters.ssh import SSHCluster
from gpu_proxy.errors import ConfigurationError
from tests.support.processes import processes_mentioning
from tests.support.sshd import sshd, this_machine_private_ip  # noqa: F401  (session fixture)


@pytest.mark.parametrize("kwargs, words", [
    (dict(head="me@gpu1.example.com"), ["private_ip is needed", "gpu1.example.com"]),
    (dict(head="me@8.8.8.8"), ["private_ip is needed", "8.8.8.8"]),
    (dict(head="me@10.0.0.5", private_ip="8.8.4.4"), ["8.8.4.4", "public"]),
    (dict(head="me@127.0.0.1", workers=["me@10.0.0.6"]), ["127.0.0.1", "workers cannot reach"]),
    (dict(head="me@10.0.0.5", workers="me@10.0.0.6"), ["list of destinations"]),
    (dict(head="me@10.0.0.5", workers=["me@10.0.0.6"], worker_private_ips=[]), ["0 addresses for 1 workers"]),
    (dict(head="me@10.0.0.5", workers=["me@gpu2"]), ["worker_private_ips[0] is needed", "gpu2"]),
    (dict(head="me@10.0.0.5", identity_file="/no/key"), ["/no/key"]),
    (dict(head="me@10.0.0.5", ray_executable="ray; rm -rf /"), ["ray_executable"]),
])
def test_bad_arguments_are_refused_before_any_connection(kwargs, words):
    with pytest.raises(ConfigurationError) as caught:
        SSHCluster(**kwargs)
    for word in words:
        assert word in str(caught.value)


def test_it_is_a_cluster_that_cannot_be_pickled_and_does_not_show_secrets():
    cluster = SSHCluster("me@10.0.0.5", workers=["me@10.0.0.6:2222"])
    assert isinstance(cluster, Cluster) and cluster.owns_nodes
    assert repr(cluster) == "SSHCluster(head='me@10.0.0.5:22', workers=['me@10.0.0.6:2222'])"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(cluster)


def test_a_missing_ray_is_reported_before_anything_starts(sshd):
    cluster = SSHCluster(sshd.destination, identity_file=sshd.private_key, known_hosts_file=sshd.known_hosts,
                         host_key_policy="strict", ray_executable="/opt/no-such-venv/bin/ray")
    with pytest.raises(ConfigurationError, match="/opt/no-such-venv/bin/ray.*is not a command"):
        cluster.start()
    assert not os.path.exists(cluster._nodes[0].folder)


@pytest.fixture(scope="module")
def two_node_cluster(sshd):
    private_ip = this_machine_private_ip()
    if private_ip is None:
        pytest.skip("this machine has no private non-loopback IPv4 address for a two-node Ray cluster")
    cluster = SSHCluster(sshd.destination, workers=[sshd.destination], identity_file=sshd.private_key,
                         known_hosts_file=sshd.known_hosts, host_key_policy="strict", private_ip=private_ip,
                         worker_private_ips=[private_ip], num_cpus=1, ray_executable=default_ray_executable(),
                         head_ports=RayPorts.free_on_this_machine(),
                         worker_ports=[RayPorts.free_on_this_machine()])
    cluster.start()
    yield cluster
    cluster.stop()


def test_two_nodes_come_up_with_their_cpus(two_node_cluster):
    assert two_node_cluster.resources()["CPU"] == 2.0
    two_node_cluster.start()  # idempotent
    assert two_node_cluster.endpoint().dashboard_url.startswith("http://127.0.0.1:")


def test_the_tunnelled_dashboard_needs_the_token(two_node_cluster):
    endpoint = two_node_cluster.endpoint()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(endpoint.dashboard_url + "/api/version", timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(endpoint.dashboard_url + "/api/version", headers=endpoint.headers())
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


@pytest.mark.timeout(180)
def test_a_ray_job_runs_through_the_tunnel(two_node_cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    endpoint = two_node_cluster.endpoint()
    client = JobSubmissionClient(endpoint.dashboard_url, headers=endpoint.headers())
    job = client.submit_job(entrypoint='python -c "import ray; ray.init(); print(ray.cluster_resources())"')
    deadline = time.monotonic() + 150
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
    assert "'CPU': 2.0" in logs


@pytest.mark.timeout(180)
def test_stop_leaves_no_process_no_folder_and_no_tunnel(sshd):
    cluster = SSHCluster(f"{sshd.user}@127.0.0.1:{sshd.port}", identity_file=sshd.private_key,
                         known_hosts_file=sshd.known_hosts, host_key_policy="strict", num_cpus=1,
                         ray_executable=default_ray_executable(), head_ports=RayPorts.free_on_this_machine())
    with cluster:
        folder = cluster._nodes[0].folder
        assert cluster.resources()["CPU"] == 1.0
        assert len(processes_mentioning(folder)) >= 3  # ray start, GCS, raylet... all under our folder
        local_port = cluster._tunnel.local_port
    assert processes_mentioning(folder) == []
    assert processes_mentioning(f"127.0.0.1:{local_port}:") == []
    assert not os.path.exists(folder)
    with pytest.raises(Exception, match="not started"):
        cluster.endpoint()
    cluster.stop()  # a second stop is harmless
