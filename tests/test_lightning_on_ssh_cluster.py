"""A Lightning run on machines reached over SSH: Ray started by gpu-proxy, the run a Ray Job
submitted through the SSH tunnel with the token, the result home."""
from __future__ import annotations

import pytest

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy.clusters.ray_node import RayPorts, default_ray_executable
from gpu_proxy.clusters.ssh import SSHCluster
from tests.lightning_project.models import fit_and_check_against_rank0


@pytest.fixture(scope="module")
def ssh_cluster(sshd):
    cluster = SSHCluster(f"{sshd.user}@127.0.0.1:{sshd.port}", identity_file=sshd.private_key,
                         known_hosts_file=sshd.known_hosts, host_key_policy="strict", private_ip="127.0.0.1",
                         num_cpus=2, ray_executable=default_ray_executable(),
                         head_ports=RayPorts.free_on_this_machine())
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.mark.timeout(300)
def test_fit_on_an_ssh_cluster_through_the_tunnel(ssh_cluster, tmp_path):
    assert ssh_cluster.dashboard_url().startswith("http://127.0.0.1:")
    fit_and_check_against_rank0(ssh_cluster, tmp_path)
