"""The one place that knows how to start a Ray head or worker node process, token auth on.

Used by the node image's entrypoint, by :class:`~gpu_proxy.clusters.ssh.SSHCluster` (which runs the
same command over SSH) and by tests that need a ``ray start`` cluster on loopback.

What Ray 2.60 binds where (checked with ``ray start`` on Linux):

* the dashboard binds ``--dashboard-host``; we always pass 127.0.0.1, so the Jobs API is reached
  through an SSH tunnel and never from the network;
* the client server, the dashboard agent's HTTP port and the runtime-env agent bind the node IP;
* the gRPC servers (GCS, raylet node and object managers, core workers, agent gRPC, metrics) bind
  127.0.0.1 only when the node IP is exactly ``127.0.0.1``, and *all interfaces* otherwise. Ray
  has no flag to narrow them, so on a multi-node cluster the network must keep them private
  (RunPod exposes only the ports a pod declares; on your own machines, a firewall).
* ``ray start`` replaces a node IP of 127.0.0.1 with the machine's routable address unless
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which also forbids worker nodes. A single-node head on
  127.0.0.1 therefore gets that variable, and then every Ray port is on loopback.
"""
from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Literal, Mapping

from gpu_proxy.errors import ConfigurationError, GpuProxyError

Role = Literal["head", "worker"]
DEFAULT_GCS_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
_LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": keep a 127.0.0.1 node IP (see above)
_DRAIN_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"  # "0": no drain on SIGTERM (see environment_overrides)

# ``ray start --block`` answers SIGTERM by stopping its processes one kind at a time (an idle node,
# or one without the drain: ~4 s). A stop ends whatever runs on the node either way, and Ray keeps
# nothing a later start needs, so after a few seconds of grace the node's session is killed.
STOP_GRACE_S = 3


class RayNodeError(GpuProxyError):
    """A Ray node process did not come up, or died."""


def generate_token() -> str:
    """A new Ray auth token, in the format ``ray get-auth-token --generate`` makes (64 hex digits)."""
    import secrets

    return secrets.token_hex(32)


@dataclass(frozen=True)
class RayPorts:
    """The ports a Ray node listens on; ``None`` leaves Ray's default.

    ``gcs``, ``dashboard`` and ``client_server`` exist on the head only. Several nodes on one
    machine (tests) need distinct values for all of them; on separate machines the defaults do.
    """

    gcs: int | None = None
    dashboard: int | None = None
    client_server: int | None = None
    dashboard_agent_listen: int | None = None
    dashboard_agent_grpc: int | None = None
    runtime_env_agent: int | None = None
    metrics_export: int | None = None
    node_manager: int | None = None
    object_manager: int | None = None
    min_worker: int | None = None
    max_worker: int | None = None

    _HEAD_ONLY = ("gcs", "dashboard", "client_server")
    _FLAGS = {"gcs": "--port", "client_server": "--ray-client-server-port", "min_worker": "--min-worker-port",
              "max_worker": "--max-worker-port"}

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None and (not isinstance(value, int) or not 1024 <= value <= 65535):
                raise ConfigurationError(
                    f"Ray port {item.name}={value!r} must be an integer between 1024 and 65535 (or None for "
                    f"Ray's default).")
        if (self.min_worker is None) != (self.max_worker is None):
            raise ConfigurationError("Give both min_worker and max_worker ports, or neither.")
        if self.min_worker is not None and self.min_worker > self.max_worker:
            raise ConfigurationError(f"min_worker={self.min_worker} is above max_worker={self.max_worker}.")

    def flags(self, role: Role) -> list[str]:
        result = []
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None or (role == "worker" and item.name in self._HEAD_ONLY):
                continue
            flag = self._FLAGS.get(item.name, "--" + item.name.replace("_", "-") + "-port")
            result.append(f"{flag}={value}")
        return result

    @classmethod
    def environment_names(cls) -> dict[str, str]:
        """Field name -> the environment variable the node image reads it from (``GCS_PORT``...)."""
        return {item.name: item.name.upper() + "_PORT" for item in fields(cls)}

    @classmethod
    def free_on_this_machine(cls, worker_port_count: int = 64) -> "RayPorts":
        """Ports free on this machine now: for several nodes on one machine, or next to other clusters."""
        taken: set[int] = set()

        def pick() -> int:
            while True:
                port = _free_port()
                if port not in taken:
                    taken.add(port)
                    return port

        singles = {item.name: pick() for item in fields(cls) if item.name not in ("min_worker", "max_worker")}
        for _ in range(200):
            low = random.randrange(20000, 60000 - worker_port_count)
            span = range(low, low + worker_port_count)
            if not taken.intersection(span) and all(_port_is_free(port) for port in span):
                return cls(**singles, min_worker=low, max_worker=low + worker_port_count - 1)
        raise RayNodeError(f"No {worker_port_count} consecutive free ports for Ray workers on this machine.")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
            return True
        except OSError:
            return False


def check_node_ip(value: str, what: str = "node IP") -> str:
    """``value`` if it is an IP address Ray may bind to: loopback or private, never public."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigurationError(
            f"{what}={value!r} is not an IP address: give the node's private IP, e.g. '10.0.0.5' "
            f"(or '127.0.0.1' for a single-node cluster).") from None
    if address.is_unspecified or address.is_multicast:
        raise ConfigurationError(
            f"{what}={value!r} would bind Ray to every interface: give the node's private IP instead.")
    if address.is_global:
        raise ConfigurationError(
            f"{what}={value!r} is a public address; Ray's ports must stay on a private network. Give the "
            f"node's private IP (e.g. 10.x, 172.16-31.x, 192.168.x) and reach the head through SSH.")
    return str(address)


def check_head_address(value: str) -> str:
    """A worker's ``host:port`` of the head's GCS; a literal IP must not be public."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"head address {value!r} must be 'host:port' of the head's GCS, e.g. '10.0.0.5:6379'.")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return value  # a private DNS name (e.g. <pod>.runpod.internal)
    check_node_ip(host, "head address")
    return value


@dataclass(frozen=True)
class RayNodeSpec:
    """One ``ray start --block`` process: a head, or a worker joining ``head_address``.

    ``token_file`` is the path of the Ray auth token *on the machine where the node runs*; the
    token itself never appears in the command or the environment, only its path.
    """

    role: Role
    node_ip: str
    token_file: str
    head_address: str | None = None
    ports: RayPorts = RayPorts()
    num_cpus: int | None = None
    num_gpus: int | None = None
    temp_dir: str | None = None
    ray_executable: str = "ray"

    def __post_init__(self) -> None:
        if self.role not in ("head", "worker"):
            raise ConfigurationError(f"role={self.role!r}: a Ray node is a 'head' or a 'worker'.")
        check_node_ip(self.node_ip, "private IP" if self.role == "worker" else "node IP")
        if self.role == "worker":
            if not self.head_address:
                raise ConfigurationError("A worker node needs head_address='<head private IP>:<GCS port>'.")
            check_head_address(self.head_address)
            if ipaddress.ip_address(self.node_ip).is_loopback:
                raise ConfigurationError(
                    f"A worker node cannot use node IP {self.node_ip}: Ray replaces a loopback address on a "
                    f"worker with the machine's routable one. Give the worker's private IP.")
        elif self.head_address:
            raise ConfigurationError("head_address is for worker nodes; a head node starts its own GCS.")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigurationError(f"{name}={value!r} must be a whole number >= 0 (or None to detect).")
        if not self.token_file:
            raise ConfigurationError("token_file is required: Ray's token auth is always on.")

    @property
    def loopback_only(self) -> bool:
        """A head on 127.0.0.1: every Ray port on loopback, no worker can join."""
        return self.role == "head" and self.node_ip == "127.0.0.1"

    @property
    def dashboard_port(self) -> int:
        return self.ports.dashboard or DEFAULT_DASHBOARD_PORT

    @property
    def gcs_address(self) -> str:
        """What workers pass as ``head_address`` to join this head."""
        host = f"[{self.node_ip}]" if ":" in self.node_ip else self.node_ip
        return f"{host}:{self.ports.gcs or DEFAULT_GCS_PORT}"

    def command(self) -> list[str]:
        """The ``ray start`` argument list (no secret in it)."""
        command = [self.ray_executable, "start", "--block", f"--node-ip-address={self.node_ip}",
                   "--disable-usage-stats"]
        if self.role == "head":
            command += ["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
        else:
            command += [f"--address={self.head_address}"]
        command += self.ports.flags(self.role)
        if self.num_cpus is not None:
            command.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            command.append(f"--num-gpus={self.num_gpus}")
        if self.temp_dir:
            command.append(f"--temp-dir={self.temp_dir}")
        return command

    def environment_overrides(self) -> dict[str, str]:
        """Variables to set for the node process (PATH aside: see :meth:`bin_dir`)."""
        overrides = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_file,
                     "RAY_USAGE_STATS_ENABLED": "0",
                     # Ray drains a node on SIGTERM for up to 30 s until its worker leases are
                     # returned (for Serve); gpu-proxy's pool workers hold theirs, so every stop after a run
                     # waited the 30 s out. gpu-proxy ends its runs before it stops a node: stop at once.
                     _DRAIN_ENV: "0"}
        if self.loopback_only:
            overrides[_LOOPBACK_ONLY_ENV] = "0"
        return overrides

    #: Variables to remove: an inherited token or address would override ours.
    environment_removals = ("RAY_AUTH_TOKEN", "RAY_ADDRESS", _LOOPBACK_ONLY_ENV)

    @property
    def bin_dir(self) -> str | None:
        """Put first on PATH, so that ``python`` in a Ray Job's entrypoint is Ray's own Python."""
        return str(Path(self.ray_executable).parent) if os.path.isabs(self.ray_executable) else None

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for name in self.environment_removals:
            env.pop(name, None)
        env.update(self.environment_overrides())
        if self.bin_dir:
            env["PATH"] = self.bin_dir + os.pathsep + env.get("PATH", os.defpath)
        return env


def default_ray_executable() -> str:
    """``ray`` beside this Python (a virtualenv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else (shutil.which("ray") or "ray")


def session_pids(session_id: int) -> list[int]:
    """Live processes of a session (Linux ``/proc``): ``ray start`` and the daemons it started.

    Zombies are left out: they hold no port or memory, and only their parent can reap them.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) != session_id:
                    continue
                with open(f"/proc/{entry}/stat") as stat_file:
                    state = stat_file.read().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                pids.append(int(entry))
    return pids


class RayNodeProcess:
    """A ``ray start --block`` process on this machine, in a session of its own (so it is ownable)."""

    def __init__(self, spec: RayNodeSpec, process: subprocess.Popen, log_path: str | None) -> None:
        self.spec = spec
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path or not Path(self.log_path).is_file():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = STOP_GRACE_S) -> None:
        """SIGTERM ``ray start`` alone (it stops its daemons in order), then kill what is left.

        Signalling the whole group at once kills the GCS first and leaves ``ray start`` waiting
        ~30 s for a GCS that is gone.
        """
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        kill_session(self.process.pid)


def kill_session(session_id: int, timeout_s: float = 10.0) -> None:
    """SIGKILL every process left in a session and wait until they are gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = session_pids(session_id)
        if not remaining:
            return
        if time.monotonic() > deadline:
            raise RayNodeError(f"Processes {remaining} of Ray session {session_id} did not exit.")
        for pid in remaining:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def start_node(spec: RayNodeSpec, log_path: str | None = None,
               base_env: Mapping[str, str] | None = None) -> RayNodeProcess:
    """Start ``spec`` on this machine; returns at once (see :func:`wait_for_nodes`).

    Ray's console output goes to ``log_path``, or to this process's stdout/stderr when it is None.
    """
    token = Path(spec.token_file)
    if not token.is_file() or not token.read_text().strip():
        raise ConfigurationError(f"The Ray token file {spec.token_file} is missing or empty.")
    if token.stat().st_mode & 0o077:
        raise ConfigurationError(
            f"The Ray token file {spec.token_file} is readable by other users: chmod 600 it.")
    output = open(log_path, "ab") if log_path else None
    try:
        process = subprocess.Popen(spec.command(), env=spec.environment(base_env), stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    except FileNotFoundError:
        raise ConfigurationError(
            f"Ray's command {spec.ray_executable!r} was not found: install ray or give its path.") from None
    finally:
        if log_path:
            output.close()
    return RayNodeProcess(spec, process, log_path)


def alive_nodes(dashboard_url: str, token: str, timeout_s: float = 5.0) -> list[dict]:
    """The ALIVE nodes the dashboard reports (raises ``HTTPCallError`` when it does not answer)."""
    from gpu_proxy.clusters.base import Endpoint
    from gpu_proxy.clusters.dashboard import DashboardClient

    return DashboardClient(Endpoint(dashboard_url, token), timeout_s).alive_nodes()


def wait_for_nodes(dashboard_url: str, token: str, count: int, timeout_s: float = 120.0,
                   failure: Callable[[], str | None] | None = None) -> list[dict]:
    """Wait until ``count`` nodes are ALIVE; ``failure()`` returns why waiting is pointless, if it is."""
    from gpu_proxy.http_transport import HTTPCallError

    deadline = time.monotonic() + timeout_s
    last = "the dashboard did not answer"
    while time.monotonic() < deadline:
        try:
            nodes = alive_nodes(dashboard_url, token)
            if len(nodes) >= count:
                return nodes
            last = f"{len(nodes)} of {count} nodes alive"
        except HTTPCallError as error:
            if error.status in (401, 403):
                raise RayNodeError(f"The Ray dashboard refused the token ({error.status}): the nodes were started "
                                   f"with a different token.") from None
            if error.status is not None:
                last = f"the dashboard answered {error.status}"
        except (OSError, ValueError, KeyError):
            pass
        reason = failure() if failure else None
        if reason:
            raise RayNodeError(reason)
        time.sleep(0.5)
    raise RayNodeError(f"The Ray cluster was not up after {timeout_s:.0f} s ({last}).")
