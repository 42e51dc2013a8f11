"""Security of the clusters gpu-proxy starts: where Ray listens, token auth, and where the token goes.

Two clusters, both started by SSHCluster through a real sshd (so ray_node's command and environment
are what runs): a single-node head on loopback, where every Ray port must be on 127.0.0.1, and a
head plus a worker on this machine's private address, where Ray 2.60 binds some gRPC servers to all
interfaces (see gpu_proxy/clusters/ray_node.py) and no port may be reachable on a public address.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import pickle
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from gpu_proxy.clusters.ray_node import RayPorts, default_ray_executable, session_pids
from gpu_proxy.clusters.ssh import SSHCluster
from tests.support.sshd import sshd, this_machine_private_ip  # noqa: F401  (session fixture)

WILDCARDS = {"0.0.0.0", "::"}


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _start(recorder: _Recorder, **kwargs) -> SSHCluster:
    root = logging.getLogger()
    level = root.level
    root.addHandler(recorder)
    root.setLevel(logging.DEBUG)
    try:
        cluster = SSHCluster(**kwargs)
        cluster.start()
        return cluster
    finally:
        root.removeHandler(recorder)
        root.setLevel(level)


def _run_job(cluster: SSHCluster) -> None:
    """One job, so that core-worker processes (and their gRPC servers) exist when sockets are listed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    endpoint = cluster.endpoint()
    client = JobSubmissionClient(endpoint.dashboard_url, headers=endpoint.headers())
    job = client.submit_job(entrypoint='python -c "import ray; ray.init(); '
                                       'print(ray.get(ray.remote(lambda: 1).remote()))"')
    deadline = time.monotonic() + 120
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)


@pytest.fixture(scope="module")
def clusters(sshd):
    private_ip = this_machine_private_ip()
    if private_ip is None:
        pytest.skip("this machine has no private non-loopback IPv4 address for a two-node Ray cluster")
    recorder = _Recorder()
    ssh = dict(identity_file=sshd.private_key, known_hosts_file=sshd.known_hosts, host_key_policy="strict",
               num_cpus=1, ray_executable=default_ray_executable())
    started = []
    try:
        started.append(_start(recorder, head=f"{sshd.user}@127.0.0.1:{sshd.port}",
                              head_ports=RayPorts.free_on_this_machine(), **ssh))
        started.append(_start(recorder, head=sshd.destination, workers=[sshd.destination], private_ip=private_ip,
                              worker_private_ips=[private_ip], head_ports=RayPorts.free_on_this_machine(),
                              worker_ports=[RayPorts.free_on_this_machine()], **ssh))
        for cluster in started:
            _run_job(cluster)
        yield {"loopback": started[0], "lan": started[1], "log": recorder.lines, "private_ip": private_ip,
               "sshd": sshd}
    finally:
        for cluster in started:
            cluster.stop()


def _node_pids(cluster: SSHCluster) -> list[int]:
    pids = [pid for node in cluster._nodes for pid in session_pids(node.pid)]
    assert len(pids) >= 4 * len(cluster._nodes), "the Ray processes were not found"
    return pids


def _listening(pids: list[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket the processes listen on."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for connection in process.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    address = connection.laddr.ip.removeprefix("::ffff:")  # IPv4-mapped on a dual-stack socket
                    found.append((process.name(), address, connection.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    assert found, "no listening socket found: the check would prove nothing"
    return found


def _this_machines_addresses() -> list[ipaddress._BaseAddress]:
    return [ipaddress.ip_address(address.address.split("%")[0])
            for addresses in psutil.net_if_addrs().values() for address in addresses
            if address.family in (socket.AF_INET, socket.AF_INET6)]


def test_a_loopback_head_listens_on_loopback_only(clusters):
    sockets = _listening(_node_pids(clusters["loopback"]))
    exposed = [entry for entry in sockets if not ipaddress.ip_address(entry[1]).is_loopback]
    assert exposed == [], f"Ray ports off loopback: {exposed}"
    assert any(name == "gcs_server" for name, _, _ in sockets) and any(name == "raylet" for name, _, _ in sockets)


def test_no_ray_port_of_a_two_node_cluster_is_on_a_public_address(clusters):
    cluster, private_ip = clusters["lan"], clusters["private_ip"]
    sockets = _listening(_node_pids(cluster))
    machine = _this_machines_addresses()
    for name, address, port in sockets:
        # A wildcard bind is reachable on every address of the machine: all must be non-public.
        reachable = machine if address in WILDCARDS else [ipaddress.ip_address(address)]
        public = [str(ip) for ip in reachable if ip.is_global]
        assert not public, f"{name} listens on {address}:{port}, reachable on public {public}"
        if address not in WILDCARDS:
            assert ipaddress.ip_address(address).is_loopback or address == private_ip, (name, address, port)
    dashboard = cluster._nodes[0].spec.dashboard_port
    assert {address for _, address, port in sockets if port == dashboard} == {"127.0.0.1"}


@pytest.mark.parametrize("kind", ["loopback", "lan"])
@pytest.mark.parametrize("path", ["/api/version", "/api/jobs/", "/api/v0/nodes", "/api/cluster_status"])
def test_requests_without_the_token_get_401_and_with_a_wrong_one_403(clusters, kind, path):
    endpoint = clusters[kind].endpoint()
    for headers, code in (({}, 401), ({"Authorization": "Bearer " + "0" * 64}, 403)):
        request = urllib.request.Request(endpoint.dashboard_url + path, headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == code, (path, headers)
    with urllib.request.urlopen(urllib.request.Request(endpoint.dashboard_url + path,
                                                       headers=endpoint.headers()), timeout=10) as answer:
        assert answer.status == 200


def _secret_sightings(pids: list[int], token: str) -> list[str]:
    seen = []
    for pid in pids:
        for kind in ("cmdline", "environ"):
            try:
                if token.encode() in Path(f"/proc/{pid}/{kind}").read_bytes():
                    seen.append(f"pid {pid} {kind}")
            except OSError:
                pass
    return seen


def test_the_token_is_in_no_command_line_and_no_environment(clusters):
    for kind in ("loopback", "lan"):
        cluster = clusters[kind]
        token = cluster.endpoint().token
        pids = _node_pids(cluster) + [clusters["sshd"].process.pid] + [
            child.pid for child in psutil.Process(clusters["sshd"].process.pid).children(recursive=True)]
        pids += [process.pid for process in psutil.process_iter(["name"]) if process.info["name"] == "ssh"]
        assert _secret_sightings(pids, token) == []
        # The only file that holds it is the token file itself, mode 0600.
        for node in cluster._nodes:
            assert oct(os.stat(node.spec.token_file).st_mode & 0o777) == "0o600"


def test_the_token_is_in_no_log(clusters):
    for kind in ("loopback", "lan"):
        cluster = clusters[kind]
        token = cluster.endpoint().token
        assert not any(token in line for line in clusters["log"])
        assert token not in clusters["sshd"].log()
        for node in cluster._nodes:
            for path in Path(node.folder).rglob("*"):
                if path.is_file() and path != Path(node.spec.token_file) and path.stat().st_size < 50_000_000:
                    assert token.encode() not in path.read_bytes(), f"token found in {path}"
    assert any("Ray is up" in line for line in clusters["log"])  # the recorder did see our logs


def test_secrets_do_not_enter_pickles(clusters):
    cluster = clusters["loopback"]
    for secret_holder in (cluster, cluster.endpoint(), cluster._tunnel):
        with pytest.raises(TypeError):
            pickle.dumps(secret_holder)
    assert cluster.endpoint().token not in repr(cluster) + repr(cluster.endpoint())
