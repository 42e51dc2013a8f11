"""A Lightning run on machines reached over SSH: Ray started by gpu-proxy, the run a Ray Job
submitted through the SSH tunnel with the token, the result home."""
from __future__ import annotations

import lightning as L
import pytest
import torch

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy.clusters.ray_node import RayPorts, default_ray_executable
from gpu_proxy.clusters.ssh import SSHCluster
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel, RecordRanks, load_record


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
    model = DigitsModel()
    trainer = L.Trainer(strategy=RemoteStrategy(cluster=ssh_cluster), accelerator="cpu", devices=2, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RecordRanks(str(tmp_path))])
    trainer.fit(model, datamodule=DigitsData(limit=200))
    rank0 = load_record(tmp_path, "fit", 0)
    for key, value in rank0["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value)
    assert trainer.state.finished and trainer.global_step == rank0["global_step"]
