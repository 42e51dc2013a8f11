"""The node image's entrypoint: start sshd with the given key, then a Ray head or worker.

Configuration comes from environment variables (the way RunPod and Docker pass it):

==========================  =============================================================
``ROLE``                    ``head`` or ``worker`` (required)
``PRIVATE_IP``              the node's private IP, where Ray listens. Default for a head:
                            ``127.0.0.1`` (a single-node cluster, every Ray port on loopback);
                            required for a worker, and for a head that workers join
``HEAD_ADDRESS``            worker only: ``<head private IP or private DNS name>:<GCS port>``
``RAY_TOKEN_FILE``          the Ray auth token's file (default ``/run/gpu-proxy/ray_token``),
                            mode 0600. It may arrive after start (copied in over SSH): the
                            entrypoint waits ``RAY_TOKEN_WAIT_S`` seconds (default 900) for it.
                            The token never travels in the environment, which clouds echo back.
``NUM_GPUS`` / ``NUM_CPUS`` what Ray may use (default: what Ray detects)
``RAY_TEMP_DIR``            Ray's temp/log folder (default Ray's, /tmp/ray)
``RAY_BIN``                 the ``ray`` command (default: beside this Python, else on PATH)
``<NAME>_PORT``             Ray's ports: ``GCS_PORT``, ``DASHBOARD_PORT``, ``CLIENT_SERVER_PORT``,
                            ``NODE_MANAGER_PORT``, ``OBJECT_MANAGER_PORT``, ``MIN_WORKER_PORT``...
``PUBLIC_KEY``              SSH public key(s) allowed to log in, one per line (RunPod's name)
``SSHD``                    ``auto`` (default: run sshd when PUBLIC_KEY is set), ``on``, ``off``
``SSHD_PORT``               default 22; ``SSHD_LISTEN_ADDRESS`` default 0.0.0.0
``SSHD_DIR``                host keys and the generated sshd_config (default /etc/ssh)
``SSH_AUTHORIZED_KEYS``     where PUBLIC_KEY is written (default ~/.ssh/authorized_keys)
``SSHD_STRICT_MODES``       ``yes`` (default) or ``no`` (keys in a world-writable folder, tests)
==========================  =============================================================

Exit status: 2 for bad configuration (with every problem listed), 1 when Ray or sshd fails,
Ray's own status when it exits, 0 after SIGTERM/SIGINT stopped the node cleanly.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from gpu_proxy.clusters.ray_node import (RayNodeSpec, RayPorts, check_head_address, check_node_ip,
                                         default_ray_executable, start_node)
from gpu_proxy.errors import ConfigurationError

PREFIX = "gpu-proxy node:"
DEFAULT_TOKEN_FILE = "/run/gpu-proxy/ray_token"
_KEY_LINE = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.\-]+)\s+[A-Za-z0-9+/]+=*(\s+\S.*)?$")


def say(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


@dataclass
class SshdConfig:
    port: int
    listen_address: str
    folder: Path
    authorized_keys: Path
    public_keys: list[str] = field(repr=False)
    strict_modes: bool
    binary: str


@dataclass
class NodeConfig:
    node: RayNodeSpec
    token_wait_s: float
    sshd: SshdConfig | None


def _integer(env: Mapping[str, str], name: str, problems: list[str], low: int = 0,
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
    role = env.get("ROLE", "").strip().lower()
    if role not in ("head", "worker"):
        problems.append(f"ROLE={env.get('ROLE')!r}: set ROLE=head or ROLE=worker.")
    private_ip = env.get("PRIVATE_IP", "").strip() or ("127.0.0.1" if role == "head" else "")
    if not private_ip and role == "worker":
        problems.append("PRIVATE_IP is required for a worker: the node's private IP, where Ray listens.")
    elif private_ip:
        try:
            check_node_ip(private_ip, "PRIVATE_IP")
        except ConfigurationError as error:
            problems.append(str(error))
    head_address = env.get("HEAD_ADDRESS", "").strip() or None
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
        port_values[name] = _integer(env, variable, problems, 1024, 65535)
    num_gpus = _integer(env, "NUM_GPUS", problems)
    num_cpus = _integer(env, "NUM_CPUS", problems)
    token_wait_s = _integer(env, "RAY_TOKEN_WAIT_S", problems)
    token_file = env.get("RAY_TOKEN_FILE", "").strip() or DEFAULT_TOKEN_FILE
    if not os.path.isabs(token_file):
        problems.append(f"RAY_TOKEN_FILE={token_file!r} must be an absolute path.")
    sshd = _read_sshd_config(env, problems)
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
    return NodeConfig(node=node, token_wait_s=900 if token_wait_s is None else token_wait_s, sshd=sshd)


def _read_sshd_config(env: Mapping[str, str], problems: list[str]) -> SshdConfig | None:
    mode = env.get("SSHD", "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        problems.append(f"SSHD={mode!r}: use auto, on or off.")
        return None
    keys = [line.strip() for line in env.get("PUBLIC_KEY", "").splitlines() if line.strip()]
    if mode == "off" or (mode == "auto" and not keys):
        return None
    if not keys:
        problems.append("SSHD=on needs PUBLIC_KEY: the SSH public key(s) allowed to log in.")
    for key in keys:
        if not _KEY_LINE.match(key):
            problems.append(f"PUBLIC_KEY has a line that is not an SSH public key: {key[:40]!r}... "
                            "(expected e.g. 'ssh-ed25519 AAAA... me@laptop').")
    binary = env.get("SSHD_BIN") or shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).is_file():
        problems.append(f"sshd is not installed ({binary}); install openssh-server or set SSHD=off.")
    strict = env.get("SSHD_STRICT_MODES", "yes").strip().lower()
    if strict not in ("yes", "no"):
        problems.append(f"SSHD_STRICT_MODES={strict!r}: use yes or no.")
    return SshdConfig(
        port=_integer(env, "SSHD_PORT", problems, 1, 65535) or 22,
        listen_address=env.get("SSHD_LISTEN_ADDRESS", "0.0.0.0").strip(),
        folder=Path(env.get("SSHD_DIR") or "/etc/ssh"),
        authorized_keys=Path(env.get("SSH_AUTHORIZED_KEYS") or Path.home() / ".ssh" / "authorized_keys"),
        public_keys=keys, strict_modes=strict != "no", binary=binary)


def start_sshd(config: SshdConfig) -> subprocess.Popen:
    """Write keys and an sshd_config that allows keys only and local forwarding only; start sshd."""
    config.folder.mkdir(parents=True, exist_ok=True)
    host_key = config.folder / "ssh_host_ed25519_key"
    if not host_key.exists():  # made per container: an image must never ship host keys
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpu-proxy-node", "-f",
                        str(host_key)], check=True, stdin=subprocess.DEVNULL)
    config.authorized_keys.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    known = config.authorized_keys.read_text().splitlines() if config.authorized_keys.exists() else []
    config.authorized_keys.write_text("\n".join(known + [k for k in config.public_keys if k not in known]) + "\n")
    config.authorized_keys.chmod(0o600)
    sshd_config = config.folder / "gpu_proxy_sshd_config"
    sshd_config.write_text("\n".join([
        f"Port {config.port}",
        f"ListenAddress {config.listen_address}",
        f"HostKey {host_key}",
        f"PidFile {config.folder / 'gpu_proxy_sshd.pid'}",
        f"AuthorizedKeysFile {config.authorized_keys}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "AllowTcpForwarding local",  # home's -L tunnels to the dashboard; nothing listens on our side
        "GatewayPorts no",
        "X11Forwarding no",
        "PermitTunnel no",
        "AllowAgentForwarding no",
        f"StrictModes {'yes' if config.strict_modes else 'no'}",
        "UsePAM no",
        "Subsystem sftp internal-sftp",
        "",
    ]))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation
    check = subprocess.run([config.binary, "-t", "-f", str(sshd_config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ConfigurationError(f"sshd refused its configuration: {check.stderr.strip()}")
    process = subprocess.Popen([config.binary, "-D", "-e", "-f", str(sshd_config)], stdin=subprocess.DEVNULL,
                               start_new_session=True)
    public = host_key.with_suffix(".pub").read_text().split()
    say(f"sshd listens on {config.listen_address}:{config.port}; host key {public[0]} {public[1]}")
    return process


class _Stop:
    """Set by SIGTERM/SIGINT; the main loop polls it."""

    def __init__(self) -> None:
        self.requested = False
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: object) -> None:
        self.requested = True


def wait_for_token(path: str, wait_s: float, stop: _Stop) -> bool:
    """True once the token file exists with private permissions; False if stopped or timed out."""
    token = Path(path)
    if not token.exists():
        say(f"waiting up to {wait_s:.0f} s for the Ray token at {path} (deliver it over SSH, mode 0600)")
    deadline = time.monotonic() + wait_s
    while not (token.is_file() and token.stat().st_size > 0):
        if stop.requested or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _end(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def main(env: Mapping[str, str] = os.environ) -> int:
    try:
        config = read_config(env)
    except ConfigurationError as error:
        say(f"bad configuration, not starting:\n{error}")
        return 2
    stop = _Stop()
    sshd = None
    try:
        # Home copies the token here over SSH; the folder must exist and be ours alone.
        Path(config.node.token_file).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if config.sshd:
            sshd = start_sshd(config.sshd)
        if not wait_for_token(config.node.token_file, config.token_wait_s, stop):
            if stop.requested:
                return 0
            say(f"no Ray token arrived at {config.node.token_file} within {config.token_wait_s:.0f} s; "
                "copy it there (mode 0600) before the wait ends, or raise RAY_TOKEN_WAIT_S.")
            return 1
        spec = config.node
        node = start_node(spec)
        where = (f"on {spec.node_ip}, GCS {spec.gcs_address}, dashboard 127.0.0.1:{spec.dashboard_port}"
                 if spec.role == "head" else f"on {spec.node_ip}, joining {spec.head_address}")
        say(f"Ray {spec.role} starting {where} (token auth on)")
    except ConfigurationError as error:
        say(f"bad configuration, not starting:\n  - {error}")
        _end(sshd)
        return 2
    try:
        while True:
            if stop.requested:
                say("stopping Ray")
                node.stop()
                return 0
            if not node.alive():
                code = node.process.returncode
                say(f"Ray exited with status {code}")
                return code or 1
            if sshd is not None and sshd.poll() is not None:
                say(f"sshd exited with status {sshd.returncode}; stopping Ray")
                node.stop()
                return 1
            time.sleep(0.5)
    finally:
        _end(sshd)


if __name__ == "__main__":
    sys.exit(main())
