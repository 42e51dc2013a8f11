"""What RunPod puts in a pod's environment, translated for the node: an Instant Cluster's rank and
addresses (``NODE_RANK``, ``MASTER_ADDR``, ``NODE_ADDR``), private names (``<podId>.runpod.internal``),
and the pod-scoped ``RUNPOD_API_KEY``, which is taken out of the environment Ray inherits."""
from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from gpu_proxy.clouds.runpod.node.pod_self import ClusterMemberSelf, PodSelf, pod_self_from_env
from gpu_proxy.clusters.ray_node import RayPorts
from gpu_proxy.errors import ConfigurationError

INTERNAL_SUFFIX = ".runpod.internal"
TEST_INTERNAL_IP_ENV = "GPU_PROXY_TEST_INTERNAL_IP"  # test only: see the table in gpu_proxy/clouds/runpod/node


def translate_instant_cluster(env: Mapping[str, str]) -> Mapping[str, str]:
    """In a RunPod Instant Cluster without ``ROLE``: rank 0 is the head, the others join ``$MASTER_ADDR``;
    one env for every node, so per-node folders and (tests) ports are derived from the rank."""
    role = env.get("ROLE", "").strip().lower()
    if role or not env.get("NODE_RANK", "").strip().isdigit() or not env.get("MASTER_ADDR", "").strip():
        return env
    rank = int(env["NODE_RANK"])
    role = "head" if rank == 0 else "worker"
    env = {**env, "ROLE": role, "PRIVATE_IP": env.get("PRIVATE_IP") or "auto"}
    if env.get("RAY_TEMP_DIR", "").strip():  # one env for every node: one folder per node
        env["RAY_TEMP_DIR"] = f"{env['RAY_TEMP_DIR'].strip().rstrip('/')}/r{rank}"
    if role == "worker":
        for variable in RayPorts.environment_names().values():
            if env.get("WORKER_" + variable, "").strip():
                env[variable] = env["WORKER_" + variable]
    if role == "worker" and not env.get("HEAD_ADDRESS"):
        # The test seam stands for every cluster address (all fake pods are on one machine).
        master = env.get(TEST_INTERNAL_IP_ENV, "").strip() or env["MASTER_ADDR"].strip()
        env["HEAD_ADDRESS"] = f"{master}:{env.get('GCS_PORT', '').strip() or 6379}"
    return env


def resolve_private_name(host: str, env: Mapping[str, str], wait_s: float = 120.0) -> str:
    """The IP of a private DNS name; RunPod's internal DNS may lag a pod's start, so wait for it."""
    if host.endswith(INTERNAL_SUFFIX) and env.get(TEST_INTERNAL_IP_ENV):
        return env[TEST_INTERNAL_IP_ENV]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return socket.gethostbyname(host)
        except OSError as error:
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"{host} does not resolve ({error}): is the pod created with global networking, in a data "
                    f"centre that supports it?") from None
            time.sleep(1.0)


def _address_towards(host: str) -> str:
    """This machine's source address for packets to ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 9))
        return sock.getsockname()[0]


def auto_private_ip(env: Mapping[str, str]) -> str:
    if env.get("MASTER_ADDR") and env.get("NODE_RANK"):  # an Instant Cluster
        if env.get(TEST_INTERNAL_IP_ENV):
            return env[TEST_INTERNAL_IP_ENV]
        return env.get("NODE_ADDR", "").strip() or _address_towards(env["MASTER_ADDR"].strip())
    pod_id = env.get("RUNPOD_POD_ID", "").strip()
    if not pod_id:
        raise ConfigurationError("PRIVATE_IP=auto needs RUNPOD_POD_ID (set by RunPod) or an Instant Cluster's "
                                 "MASTER_ADDR and NODE_RANK; elsewhere give the node's private IP.")
    return resolve_private_name(pod_id + INTERNAL_SUFFIX, env)


def resolve_head_address(value: str, env: Mapping[str, str]) -> str:
    host, _, port = value.rpartition(":")
    if host.endswith(INTERNAL_SUFFIX):
        return f"{resolve_private_name(host, env)}:{port}"
    return value




def private_environment(env: Mapping[str, str]) -> "PodSelf | ClusterMemberSelf | None":
    """Take RunPod's pod-scoped key out of the environment Ray and the user's code inherit; keep it
    in memory for the idle watcher only. Point NCCL at an Instant Cluster's ``ens*`` interfaces."""
    pod = pod_self_from_env(dict(env))
    if pod is not None and env.get("MASTER_ADDR") and env.get("NODE_RANK"):
        pod = ClusterMemberSelf(pod)
    if env is os.environ:
        os.environ.pop("RUNPOD_API_KEY", None)
        if os.environ.get("MASTER_ADDR") and os.environ.get("NODE_RANK"):
            os.environ.setdefault("NCCL_SOCKET_IFNAME", "ens")  # the cluster's fast interfaces, not eth0
    return pod
