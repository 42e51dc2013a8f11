"""The embedded cluster opens no port beyond loopback: a laptop on café Wi-Fi exposes nothing."""
from __future__ import annotations

import ipaddress

import psutil
import ray

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project import big_models


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def test_every_listener_of_the_embedded_cluster_is_on_loopback(local_cluster):
    big_models.trainer(RemoteStrategy(cluster=local_cluster, num_workers=1)).fit(
        big_models.BigModel(0.01), train_dataloaders=big_models.loader())  # pooled workers stay up
    session = ray._private.worker._global_node.get_session_dir_path()
    home = psutil.Process()
    cluster = {home.pid}  # home, the embedded cluster's daemons, and the workers they started
    for process in home.children(recursive=True):  # (not the suite's other clusters: a `ray start` head)
        try:
            if session in " ".join(process.cmdline()):
                cluster |= {process.pid} | {child.pid for child in process.children(recursive=True)}
        except psutil.Error:
            continue
    listeners = [c for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in cluster]
    assert len(listeners) >= 5  # GCS, raylet, agents, workers: the cluster's own
    exposed = [(c.pid, c.laddr) for c in listeners if not _loopback(c.laddr.ip)]
    assert exposed == [], f"listening beyond loopback: {exposed}"
