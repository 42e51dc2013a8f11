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


@pytest.mark.timeout(600)
def test_a_1gb_model_streams_over_ssh_both_ways(ssh_cluster, monkeypatch):
    """The data plane of an SSH cluster: ~1 GB out and back over the SSH connection, nothing via the dashboard."""
    from gpu_proxy.dataplane.ssh import SSHPlane
    from gpu_proxy_lightning import RemoteStrategy
    from tests.lightning_project import big_models
    from tests.core.test_data_plane import _check

    fetched, original = [], SSHPlane.fetch
    monkeypatch.setattr(SSHPlane, "fetch", lambda self, result: fetched.append((self.folder, result)) or original(self, result))
    _check(big_models.fit_validate_predict(RemoteStrategy(cluster=ssh_cluster, num_workers=1), 1024,
                                          evaluate_megabytes=8))  # over the inline limit, as attach's below
    folder, result = fetched[0]
    if folder.startswith("/dev/shm/"):  # the lone worker trained the payload's own pages: they stream home from there
        assert result.spans_of == "payload" and result.size < 8 << 20 and result.sha256 is None
    root = ssh_cluster.data_root
    import os

    assert os.listdir(root) == []  # every run's folder on the head removed once home had its results


@pytest.mark.timeout(300)
def test_attach_brings_a_finished_detached_runs_results_home(ssh_cluster):
    """A detached run's large results wait on the head until attach fetches them, then they are removed."""
    import os
    import time

    import gpu_proxy
    from gpu_proxy_lightning import RemoteStrategy
    from tests.lightning_project import big_models

    model = big_models.BigModel(8)  # over the inline limit: its weights go through the data plane
    strategy = RemoteStrategy(cluster=ssh_cluster, num_workers=1, detach=True)
    big_models.trainer(strategy).fit(model, train_dataloaders=big_models.loader())
    folder = os.path.join(ssh_cluster.data_root, strategy.run_id)
    def finished() -> bool:  # the result is written before the payload is removed: wait for both
        return os.path.exists(os.path.join(folder, "result-0")) and not os.path.exists(os.path.join(folder, "payload"))

    deadline = time.monotonic() + 120
    while not finished() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert finished()
    outputs = gpu_proxy.attach(strategy.run_id, cluster=ssh_cluster, on_event=lambda event: None)
    weights = outputs[0].weights
    assert weights["bulk"].shape == model.bulk.shape
    assert not torch_equal(weights["bulk"], model.bulk)  # rank 0 changed it on the worker
    assert not os.path.exists(folder)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
