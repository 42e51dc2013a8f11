"""The node's configuration, read from its environment (the table in :mod:`gpu_proxy.clouds.runpod.node`);
every problem is listed at once, before anything starts."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from gpu_proxy.clouds.runpod.node.idle_watch import parse_seconds
from gpu_proxy.clouds.runpod.node.runpod_env import auto_private_ip, resolve_head_address, translate_instant_cluster
from gpu_proxy.clouds.runpod.node.sshd import SshdConfig, read_sshd_config
from gpu_proxy.clusters.ray_node import (RayNodeSpec, RayPorts, check_head_address, check_node_ip,
                                         default_ray_executable)
from gpu_proxy.errors import ConfigurationError

DEFAULT_TOKEN_FILE = "/run/gpu-proxy/ray_token"


@dataclass
class NodeConfig:
    node: RayNodeSpec
    token_wait_s: float
    sshd: SshdConfig | None
    idle_timeout_s: float | None = None



def integer(env: Mapping[str, str], name: str, problems: list[str], low: int = 0,
             high: int | None = None) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
        limit = f"between {low} and {high}" if high is not None else f">= {low}"
        problems.append(f"{name}={text!r} must be a whole number {limit}.")
        return None
    return int(text)


def read_config(env: Mapping[str, str]) -> NodeConfig:
    """The node's configuration from ``env``; raises ConfigurationError listing every problem."""
    problems: list[str] = []
    env = translate_instant_cluster(env)
    role = env.get("ROLE", "").strip().lower()
    if role not in ("head", "worker"):
        problems.append(f"ROLE={env.get('ROLE')!r}: set ROLE=head or ROLE=worker.")
    private_ip = env.get("PRIVATE_IP", "").strip() or ("127.0.0.1" if role == "head" else "")
    if private_ip.lower() == "auto":
        try:
            private_ip = auto_private_ip(env)
        except (ConfigurationError, OSError) as error:
            problems.append(f"PRIVATE_IP=auto: {error}")
            private_ip = ""
    if not private_ip and role == "worker":
        problems.append("PRIVATE_IP is required for a worker: the node's private IP, where Ray listens.")
    elif private_ip:
        try:
            check_node_ip(private_ip, "PRIVATE_IP")
        except ConfigurationError as error:
            problems.append(str(error))
    head_address = env.get("HEAD_ADDRESS", "").strip() or None
    if head_address and role == "worker":
        try:
            head_address = resolve_head_address(head_address, env)
        except ConfigurationError as error:
            problems.append(f"HEAD_ADDRESS: {error}")
    if role == "worker" and not head_address:
        problems.append("HEAD_ADDRESS is required for a worker: '<head private IP>:<GCS port>', e.g. 10.0.0.5:6379.")
    elif role == "head" and head_address:
        problems.append(f"HEAD_ADDRESS={head_address!r} is for workers; unset it for ROLE=head.")
    elif head_address:
        try:
            check_head_address(head_address)
        except ConfigurationError as error:
            problems.append(f"HEAD_ADDRESS: {error}")
    port_values = {}
    for name, variable in RayPorts.environment_names().items():
        port_values[name] = integer(env, variable, problems, 1024, 65535)
    num_gpus = integer(env, "NUM_GPUS", problems)
    num_cpus = integer(env, "NUM_CPUS", problems)
    token_wait_s = integer(env, "RAY_TOKEN_WAIT_S", problems)
    idle_timeout_s = None
    try:
        idle_timeout_s = parse_seconds(env.get("IDLE_TIMEOUT_S", ""))
    except (ValueError, KeyError):
        problems.append(f"IDLE_TIMEOUT_S={env.get('IDLE_TIMEOUT_S')!r}: give seconds, or e.g. 10m, 1h.")
    token_file = env.get("RAY_TOKEN_FILE", "").strip() or DEFAULT_TOKEN_FILE
    if not os.path.isabs(token_file):
        problems.append(f"RAY_TOKEN_FILE={token_file!r} must be an absolute path.")
    sshd = read_sshd_config(env, problems)
    ports = None
    if not problems:
        try:
            ports = RayPorts(**port_values)
        except ConfigurationError as error:
            problems.append(str(error))
    if problems:
        raise ConfigurationError("\n".join(f"  - {problem}" for problem in problems))
    node = RayNodeSpec(role, private_ip, token_file, head_address=head_address, ports=ports, num_cpus=num_cpus,
                       num_gpus=num_gpus, temp_dir=env.get("RAY_TEMP_DIR") or None,
                       ray_executable=env.get("RAY_BIN") or default_ray_executable())
    return NodeConfig(node=node, token_wait_s=900 if token_wait_s is None else token_wait_s, sshd=sshd,
                      idle_timeout_s=idle_timeout_s)
