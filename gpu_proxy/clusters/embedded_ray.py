"""How a one-node Ray cluster owned by this process starts and ends: the parts of Ray's own start it
changes, and why. The embedded cluster's, and a serverless worker's (``cluster_image/serverless``).

``ray.init(address="local")`` starts a node as for any cluster. These clusters are one node on
one machine, used by this process alone, so ``start_ray`` changes three things, each for the
duration of the call only (a ``ray start`` or another ``ray.init`` in this process later gets
Ray's own behaviour), and the embedded cluster a fourth at exit:

1. Loopback only: every port on 127.0.0.1 (Ray would rewrite that address to the machine's).
2. The dashboard agent binds a port of its own choosing, not Ray's fixed 52365 (which any other
   Ray on the machine may hold).
3. No API server unless a dashboard was asked for: without the dashboard it serves usage
   statistics alone (off for a ``ray.init`` cluster), and ``ray.init`` waits for it.
4. At interpreter exit, the node's processes are killed without Ray's grace, agents included.

Each reaches into ``ray._private`` (Ray is pinned; :mod:`gpu_proxy.version_gates` checks it).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Iterator

import psutil
import ray
from gpu_proxy import version_gates

version_gates.check("ray")  # before any use of Ray's private parts
from ray._private import node as ray_node, parameter, ray_constants  # private: see the module docstring

_LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The changes patch module-level names of Ray: two starts at once would each restore the other's.
_patch_lock = threading.Lock()


def start_ray(num_cpus: int | None, num_gpus: int | None, include_dashboard: bool = False,
              **init_options: Any) -> None:
    """``ray.init`` of a new one-node cluster on loopback, with changes 1-3 of the module docstring;
    ``init_options`` go to ``ray.init`` as they are (``_temp_dir``, ``object_store_memory``).

    Token auth: Ray >= 2.59 turns it on for a cluster ``ray.init()`` starts and makes a token
    (~/.ray/auth_token) when none exists; setting RAY_AUTH_MODE=token here would stop it from making
    one. An explicit RAY_AUTH_MODE=disabled from the user is respected.
    """
    with _patch_lock, _loopback_only(), _agent_picks_its_port(), _api_server_only_with_dashboard():
        ray.init(
            address="local",  # always a new cluster: never attach to another `ray start` here
            num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address="127.0.0.1",
            include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
            log_to_driver=False,  # workers' output comes home on the run's event stream
            logging_level=logging.WARNING, **init_options,
        )


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """With a node IP of exactly 127.0.0.1 Ray binds every port there (see
    gpu_proxy/clusters/ray_node.py): a laptop on café Wi-Fi exposes nothing. Ray rewrites 127.0.0.1
    to the machine's address unless this variable is "0": its child processes read it from their
    environment, this process read it into a constant when Ray was imported."""
    saved = os.environ.get(_LOOPBACK_ONLY_ENV)
    os.environ[_LOOPBACK_ONLY_ENV] = "0"
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        if saved is None:
            os.environ.pop(_LOOPBACK_ONLY_ENV, None)
        else:
            os.environ[_LOOPBACK_ONLY_ENV] = saved


@contextlib.contextmanager
def _agent_picks_its_port() -> Iterator[None]:
    """``ray.init`` has no argument for the agent's port. On 52365 the agent of any other Ray on
    this machine (a kept ``gpu-proxy up local``, a test session's cluster, a script still running,
    or the last script's agent in its last seconds) makes this one retry its bind for 3.3 s, and
    the raylet waits for the agent: measured, a fresh script's ``ray.init`` took 7 s instead of 3 s.
    With 0 the agent binds a port the kernel picks, and the node reads it back from the GCS."""
    params_init = parameter.RayParams.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        params_init(self, *args, **kwargs)

    parameter.RayParams.__init__ = init
    try:
        yield
    finally:
        parameter.RayParams.__init__ = params_init


@contextlib.contextmanager
def _api_server_only_with_dashboard() -> Iterator[None]:
    """Without the dashboard, Ray's head still starts its API server with one module (usage
    statistics, which Ray turns off for a cluster ``ray.init`` starts), and ``ray.init`` polls
    until it registered: ~0.7 s of a fresh script here, and a Python process of ~120 MB for
    nothing."""
    start_api_server = ray_node.Node.start_api_server

    def start_if_dashboard(self: Any, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
        if include_dashboard:
            start_api_server(self, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)

    ray_node.Node.start_api_server = start_if_dashboard
    try:
        yield
    finally:
        ray_node.Node.start_api_server = start_api_server


def end_ray_processes_without_grace() -> None:
    """At interpreter exit, let ``ray.shutdown`` kill the cluster's processes at once (change 4).

    ``ray.shutdown`` sends each kind of process (raylet, GCS, log monitor...) SIGTERM and waits up
    to a second for it, one kind after the other: ~3 s at the end of every script, for processes
    whose state ends with the script anyway (the object store is in memory, workers die with their
    raylet). Ray's own call is kept (the driver disconnects first, the node's files are cleaned);
    only its grace is skipped. Without its SIGTERM the raylet cannot end the agents it started
    (dashboard agent, runtime-env agent), which would outlive the script by about a minute: they
    are killed with it.
    """
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return
    kill_all = node.kill_all_processes

    def kill_all_at_once(*args: Any, **kwargs: Any) -> None:
        children = _raylet_children(node)
        kill_all(*args, **{**kwargs, "allow_graceful": False})
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass  # gone already

    node.kill_all_processes = kill_all_at_once


def _raylet_children(node: Any) -> list[psutil.Process]:
    try:
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        if raylet.poll() is not None:
            return []  # exited and reaped: its pid may be another process's now
        return psutil.Process(raylet.pid).children(recursive=True)
    except (KeyError, IndexError, AttributeError, psutil.Error):
        return []
