"""Home's side of bringing Ray up on pods it reaches over SSH: wait for sshd, deliver the Ray token
(a 0600 file, never an environment variable or a command line), tunnel to the head's dashboard
(which listens on the head's loopback only), and wait for every node and GPU to join.

Cloud-independent: every function takes SSH targets and a ``failure()`` probe that says why the
machines are gone (a RunPod pod that stopped), so a wait ends with the cause, not a timeout.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from gpu_proxy.clouds.runpod.provision import LaunchError
from gpu_proxy.clusters.ray_node import RayNodeError, wait_for_nodes
from gpu_proxy.ssh import SSHError, SSHTarget, SSHTunnel, put_file, run_remote

Failure = Callable[[], "str | None"]


def wait_for_ssh(target: SSHTarget, timeout_s: float, failure: Failure, hint: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            run_remote(target, "true", timeout_s=30)
            return
        except SSHError as error:
            last = str(error)
        why = failure()
        if why:
            raise LaunchError(why)
        if time.monotonic() > deadline:
            raise LaunchError(f"The pod's sshd did not answer within {timeout_s:.0f} s: {last}" + (f"\n{hint}" if hint else ""))
        time.sleep(1.0)


def deliver_token(targets: Iterable[SSHTarget], path: str, token: str) -> None:
    """Copy the token to every node as a 0600 file (the node's entrypoint waits for it)."""
    for target in targets:
        put_file(target, path, token)


def open_dashboard_tunnel(head: SSHTarget, dashboard_port: int, timeout_s: float, failure: Failure,
                          opened: Callable[[SSHTunnel], None]) -> SSHTunnel:
    """A local port forwarded to the head's dashboard; returns once the dashboard answers. ``opened`` gets
    the tunnel before it is waited on, so the caller can close it whatever happens."""
    tunnel = SSHTunnel(head, dashboard_port, ready_timeout_s=timeout_s)
    opened(tunnel)
    try:
        tunnel.open()
    except SSHError as error:
        raise LaunchError(f"The Ray head did not come up on the pod: {failure() or error}") from None
    return tunnel


def wait_for_nodes_and_gpus(dashboard_url: str, token: str, nodes: int, gpus: float, timeout_s: float,
                            failure: Failure, gpus_seen: Callable[[], float]) -> None:
    """Until ``nodes`` Ray nodes and ``gpus`` GPUs joined; the failure probe runs every ~10th poll."""
    checks = iter(range(10**9))
    sometimes = lambda: failure() if next(checks) % 10 == 9 else None  # noqa: E731
    try:
        wait_for_nodes(dashboard_url, token, nodes, timeout_s=timeout_s, failure=sometimes)
    except RayNodeError as error:
        raise LaunchError(f"Ray did not come up on the pods: {error}") from None
    deadline = time.monotonic() + timeout_s
    while (found := gpus_seen()) < gpus:
        if time.monotonic() > deadline:
            raise LaunchError(f"Ray sees {found:g} of the {gpus:g} GPUs rented after {timeout_s:.0f} s: "
                              f"the image's CUDA may not match the host's driver.")
        time.sleep(1.0)
