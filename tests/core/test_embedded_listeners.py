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


def _exposed_listeners_while(run, home: psutil.Process) -> tuple[list, int]:
    """Run ``run()`` while sampling the listeners of home and of the embedded cluster's processes (its
    daemons, and everything under them: agents, workers and their children; not the suite's other
    clusters); return those seen beyond loopback, and how many listeners were seen in all."""
    import threading

    seen: set = set()
    done = threading.Event()
    session = ray._private.worker._global_node.get_session_dir_path()

    def sample():
        while not done.is_set():
            pids = {home.pid}
            for daemon in [p for p in home.children(recursive=True) if session in _command(p)]:
                try:  # a process may end while we look: skip it, keep sampling
                    pids |= {daemon.pid} | {p.pid for p in daemon.children(recursive=True)}
                except psutil.Error:
                    pass
            for c in psutil.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN and c.pid in pids:
                    seen.add((c.pid, c.laddr.ip, c.laddr.port))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join(10)
    return sorted(s for s in seen if not _loopback(s[1])), len(seen)


def test_a_two_worker_ddp_run_listens_on_loopback_only(local_cluster):
    import time

    import lightning as L

    from tests.lightning_project.models import DigitsData, DigitsModel

    class Slow(DigitsModel):  # a few seconds of training: the sampler sees the store and gloo's pairs
        def training_step(self, batch, batch_idx):
            time.sleep(0.1)
            return super().training_step(batch, batch_idx)

    trainer = L.Trainer(strategy=RemoteStrategy(cluster=local_cluster), accelerator="cpu", devices=2,
                        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    exposed, count = _exposed_listeners_while(
        lambda: trainer.fit(Slow(), datamodule=DigitsData(limit=300)), psutil.Process())
    print(f"2-worker DDP on the embedded cluster: {count} listeners, {len(exposed)} beyond loopback: {exposed}")
    assert count >= 5
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_on_a_cluster_by_address_our_own_sockets_are_on_loopback(ray_head):
    """The run server, torch's store and gloo's pairs, on a single-node cluster given by address. Ray's
    own ports there (its worker port range, its daemons) follow the cluster's `ray start`, not us."""
    import re
    import threading
    import time

    import lightning as L

    from gpu_proxy import RayCluster
    from tests.lightning_project.models import DigitsData, DigitsModel

    head = psutil.Process(ray_head.process.pid)
    low, high = (int(re.search(rf"--{which}-worker-port=(\d+)", _command(head)).group(1)) for which in ("min", "max"))

    class Slow(DigitsModel):
        def training_step(self, batch, batch_idx):
            time.sleep(0.1)
            return super().training_step(batch, batch_idx)

    seen: set = set()
    done = threading.Event()

    def sample():
        while not done.is_set():
            ours = {p.pid for p in head.children(recursive=True)
                    if _command(p).startswith("ray::PoolWorker") or "gpu_proxy.runs.server" in _command(p)}
            for c in psutil.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN and c.pid in ours and not low <= c.laddr.port <= high:
                    seen.add((c.pid, c.laddr.ip, c.laddr.port))
            done.wait(0.2)

    trainer = L.Trainer(strategy=RemoteStrategy(cluster=RayCluster(ray_head.dashboard_url, token=ray_head.token)),
                        accelerator="cpu", devices=2, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        trainer.fit(Slow(), datamodule=DigitsData(limit=300))
    finally:
        done.set()
        sampler.join(10)
    exposed = sorted(s for s in seen if not _loopback(s[1]))
    print(f"2-worker DDP by address: {len(seen)} listeners of ours beyond Ray's, {len(exposed)} beyond loopback")
    assert len(seen) >= 2  # at least the run server and torch's store
    assert exposed == [], f"listening beyond loopback: {exposed}"
