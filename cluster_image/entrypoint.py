"""The node image's entrypoint: start sshd with the given key, then a Ray head or worker.

Configuration comes from environment variables (the way RunPod and Docker pass it):

==========================  =============================================================
``ROLE``                    ``head`` or ``worker`` (required)
``PRIVATE_IP``              the node's private IP, where Ray listens. Default for a head:
                            ``127.0.0.1`` (a single-node cluster, every Ray port on loopback);
                            required for a worker, and for a head that workers join.
                            ``auto``: learn it: on a RunPod pod with global networking, the
                            address of ``$RUNPOD_POD_ID.runpod.internal``; in a RunPod Instant
                            Cluster, ``$NODE_ADDR`` or the address that reaches ``$MASTER_ADDR``
``HEAD_ADDRESS``            worker only: ``<head private IP or private DNS name>:<GCS port>``;
                            a ``*.runpod.internal`` name is resolved here (Ray gets the IP)
``NODE_RANK``, ``MASTER_ADDR``  set by RunPod in an Instant Cluster (with ``NODE_ADDR``,
                            ``NUM_NODES``, ...): without ``ROLE``, rank 0 is the head and the
                            others join ``$MASTER_ADDR:<GCS port>``; NCCL is pointed at the
                            cluster's ``ens*`` interfaces (``NCCL_SOCKET_IFNAME``). Every node gets
                            the same env there, so ``RAY_TEMP_DIR`` becomes ``<it>/r<NODE_RANK>``
                            and ranks above 0 take ``WORKER_<NAME>_PORT`` over ``<NAME>_PORT``
                            when given (several nodes on one machine: tests). Idle, a member ends
                            its whole cluster (``DELETE /v2/clusters/{id}``: RunPod refuses to
                            terminate one member through the pod endpoints)
``IDLE_TIMEOUT_S``          end this pod (RunPod REST v2, with the pod-scoped ``RUNPOD_API_KEY``
                            RunPod injects) after this long with no Ray Job and no home
                            heartbeat; ``600``, ``10m``, ``1h``. See ``idle_watch.py``
``GPU_PROXY_TEST_INTERNAL_IP``  TEST ONLY (RunPod never sets it): the address every
                            ``*.runpod.internal`` name and every Instant Cluster address
                            (``MASTER_ADDR``, ``NODE_ADDR``) stands for; the tests' fake RunPod,
                            whose pods are processes on one machine, sets it to that machine's address
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
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

# Ray reads its auth mode once, when it is first imported (gpu_proxy imports it): this process's own
# GCS client (the idle watcher's) must use token auth like the node it starts.
if __name__ == "__main__":  # as the node's process only: importing this module changes nothing
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH",
                          os.environ.get("RAY_TOKEN_FILE", "").strip() or "/run/gpu-proxy/ray_token")

from gpu_proxy.clusters.ray_node import (RayNodeSpec, RayPorts, check_head_address, check_node_ip,
                                         default_ray_executable, start_node)
from gpu_proxy.errors import ConfigurationError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # idle_watch.py beside this file
from idle_watch import Activity, IdleWatch, PodSelf, parse_seconds, pod_self_from_env  # noqa: E402

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
    idle_timeout_s: float | None = None


INTERNAL_SUFFIX = ".runpod.internal"
TEST_INTERNAL_IP_ENV = "GPU_PROXY_TEST_INTERNAL_IP"  # test only: see the table above


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


def _auto_private_ip(env: Mapping[str, str]) -> str:
    if env.get("MASTER_ADDR") and env.get("NODE_RANK"):  # an Instant Cluster
        if env.get(TEST_INTERNAL_IP_ENV):
            return env[TEST_INTERNAL_IP_ENV]
        return env.get("NODE_ADDR", "").strip() or _address_towards(env["MASTER_ADDR"].strip())
    pod_id = env.get("RUNPOD_POD_ID", "").strip()
    if not pod_id:
        raise ConfigurationError("PRIVATE_IP=auto needs RUNPOD_POD_ID (set by RunPod) or an Instant Cluster's "
                                 "MASTER_ADDR and NODE_RANK; elsewhere give the node's private IP.")
    return resolve_private_name(pod_id + INTERNAL_SUFFIX, env)


def _resolve_head_address(value: str, env: Mapping[str, str]) -> str:
    host, _, port = value.rpartition(":")
    if host.endswith(INTERNAL_SUFFIX):
        return f"{resolve_private_name(host, env)}:{port}"
    return value


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
    instant = not role and env.get("NODE_RANK", "").strip().isdigit() and env.get("MASTER_ADDR", "").strip()
    if instant:  # RunPod's Instant Cluster: rank 0 is the head, every node learns its address
        rank = int(env["NODE_RANK"])
        role = "head" if rank == 0 else "worker"
        env = {**env, "PRIVATE_IP": env.get("PRIVATE_IP") or "auto"}
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
    if role not in ("head", "worker"):
        problems.append(f"ROLE={env.get('ROLE')!r}: set ROLE=head or ROLE=worker.")
    private_ip = env.get("PRIVATE_IP", "").strip() or ("127.0.0.1" if role == "head" else "")
    if private_ip.lower() == "auto":
        try:
            private_ip = _auto_private_ip(env)
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
            head_address = _resolve_head_address(head_address, env)
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
        port_values[name] = _integer(env, variable, problems, 1024, 65535)
    num_gpus = _integer(env, "NUM_GPUS", problems)
    num_cpus = _integer(env, "NUM_CPUS", problems)
    token_wait_s = _integer(env, "RAY_TOKEN_WAIT_S", problems)
    idle_timeout_s = None
    try:
        idle_timeout_s = parse_seconds(env.get("IDLE_TIMEOUT_S", ""))
    except (ValueError, KeyError):
        problems.append(f"IDLE_TIMEOUT_S={env.get('IDLE_TIMEOUT_S')!r}: give seconds, or e.g. 10m, 1h.")
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
    return NodeConfig(node=node, token_wait_s=900 if token_wait_s is None else token_wait_s, sshd=sshd,
                      idle_timeout_s=idle_timeout_s)


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


class ClusterMemberSelf:
    """A member of a RunPod Instant Cluster, ending itself: RunPod refuses (409) to terminate or stop a
    member pod through the pod endpoints, so it reads its own pod (``cluster.id``) and deletes the whole
    cluster, with the same pod-scoped key. Whether RunPod lets a pod-scoped key delete its own cluster
    is not documented: if it refuses, the caller stops Ray and says that billing continues."""

    def __init__(self, pod: PodSelf) -> None:
        self.pod = pod

    def __repr__(self) -> str:
        return f"ClusterMemberSelf({self.pod.pod_id!r})"

    def _call(self, method: str, path: str) -> tuple[int, dict]:
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.pod.base_url + path, method=method, headers={
            "Authorization": f"Bearer {self.pod._key}", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                raw = answer.read()
                return answer.status, (json.loads(raw) if raw.strip() else {})
        except urllib.error.HTTPError as error:
            return error.code, {}

    def end(self, say, attempts: int = 5) -> bool:
        pod_id = self.pod.pod_id
        for attempt in range(attempts):
            try:
                status, data = self._call("GET", f"/v2/pods/{pod_id}")
                if status == 404:
                    say(f"pod {pod_id} is already gone")
                    return True
                cluster_id = (data.get("cluster") or {}).get("id") if status == 200 else None
                if status == 200 and not cluster_id:
                    return self.pod.end(say, attempts)  # not a cluster member after all
                if cluster_id:
                    status, _ = self._call("DELETE", f"/v2/clusters/{cluster_id}")
                    if status in (200, 204, 404):
                        say(f"pod {pod_id} deleted its Instant Cluster {cluster_id} ({status}): all its pods end")
                        return True
                    if status in (401, 403):
                        say(f"RunPod answered {status}: this pod's key may not delete its Instant Cluster "
                            f"{cluster_id}")
                        return False
                say(f"RunPod answered {status} when pod {pod_id} tried to end its Instant Cluster")
            except OSError as error:  # urllib's URLError is an OSError
                say(f"could not reach RunPod to end the Instant Cluster of pod {pod_id}: {error}")
            time.sleep(min(30, 2 ** attempt))
        return False


def _private_environment(env: Mapping[str, str]) -> "PodSelf | ClusterMemberSelf | None":
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


def _end_self(pod: "PodSelf | ClusterMemberSelf | None", stop: "_Stop") -> None:
    if pod is None:
        say("idle: not on a RunPod pod (no RUNPOD_POD_ID/RUNPOD_API_KEY); stopping Ray and exiting instead")
        stop.requested = True
        return
    if not pod.end(say):
        say("idle: could not end this pod through RunPod's API; stopping Ray (GPU billing continues until "
            "the pod is stopped: stop it in the RunPod console)")
        stop.requested = True


def _watch_idle(config: NodeConfig, pod: "PodSelf | ClusterMemberSelf | None", stop: "_Stop") -> IdleWatch | None:
    spec = config.node
    if config.idle_timeout_s is None or spec.role != "head":
        return None
    activity = Activity(f"http://127.0.0.1:{spec.dashboard_port}", spec.gcs_address, spec.token_file)
    return IdleWatch(activity, config.idle_timeout_s, lambda: _end_self(pod, stop), say).start()


def main(env: Mapping[str, str] = os.environ) -> int:
    try:
        config = read_config(env)
    except ConfigurationError as error:
        say(f"bad configuration, not starting:\n{error}")
        return 2
    pod = _private_environment(env)
    stop = _Stop()
    sshd = None
    watch = None
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
        watch = _watch_idle(config, pod, stop)
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
                if config.idle_timeout_s is not None and spec.role == "worker":
                    # The head is gone (ended itself when idle, or was terminated): so is this node's use.
                    _end_self(pod, stop)
                return code or 1
            if sshd is not None and sshd.poll() is not None:
                say(f"sshd exited with status {sshd.returncode}; stopping Ray")
                node.stop()
                return 1
            time.sleep(0.5)
    finally:
        if watch is not None:
            watch.close()
        _end(sshd)


if __name__ == "__main__":
    sys.exit(main())
