"""The embedded cluster's own processes open no port beyond loopback: a laptop on café Wi-Fi exposes
nothing of Ray (gcs, raylet, agents, home's core worker)."""
from __future__ import annotations

import ipaddress

import psutil
import ray

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project import big_models


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def test_every_listener_of_the_embedded_cluster_is_on_loopback(local_cluster):
    big_models.trainer(RemoteStrategy(cluster=local_cluster, num_workers=1)).fit(
        big_models.BigModel(0.01), train_dataloaders=big_models.loader())  # pooled workers stay up
    session = ray._private.worker._global_node.get_session_dir_path()
    home = psutil.Process()
    # Home and the embedded cluster's daemons (GCS, raylet, dashboard agent, runtime-env agent...), not
    # the suite's other clusters. Worker processes are left out: besides Ray's own port, a worker of a
    # DDP run opens torch's TCPStore on every interface (issue 20 keeps that open).
    daemons = [p for p in home.children(recursive=True) if session in _command(p)]
    cluster = {home.pid} | {p.pid for p in daemons}
    for daemon in daemons:  # the raylet's agents name no session in their command line
        cluster |= {c.pid for c in daemon.children()
                    if _command(c).startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))}
    listeners = [c for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in cluster]
    assert len(listeners) >= 5  # GCS, raylet, the agents, home: the cluster's own
    exposed = [(c.pid, c.laddr) for c in listeners if not _loopback(c.laddr.ip)]
    assert exposed == [], f"listening beyond loopback: {exposed}"
