"""Ray on your own machines over SSH: token auth on, the head reached through an SSH tunnel.

``start()`` makes a token here, copies it to every node as a 0600 file over SSH (never on a
command line), starts ``ray start --block`` on the head and then on the workers (each in a session
of its own that outlives the ssh connection), and tunnels a local port to the head's dashboard,
which listens on the head's loopback only. ``stop()`` stops what it started and closes the tunnel.
"""
from __future__ import annotations

import ipaddress
import logging
import secrets
import shlex
import weakref
from dataclasses import dataclass
from typing import Sequence

from gpu_proxy.clusters.base import Endpoint, SSHReachedCluster
from gpu_proxy.clusters.ray_bootstrap import (deliver_token, detached_script, open_dashboard_tunnel,
                                              wait_for_nodes_and_gpus)
from gpu_proxy.clusters.ray_node import (STOP_GRACE_S, RayNodeError, RayNodeSpec, RayPorts, check_node_ip,
                                         generate_token)
from gpu_proxy.errors import ConfigurationError, GpuProxyError
from gpu_proxy.ssh import SSHError, SSHTarget, SSHTunnel, run_remote
from gpu_proxy.ssh.target import HostKeyPolicy

log = logging.getLogger(__name__)


@dataclass
class _Node:
    target: SSHTarget
    spec: RayNodeSpec
    folder: str  # on the node: token, pid, log, Ray's temp dir
    pid: int | None = None
    prepared: bool = False  # the folder exists on the node: stop() must clean it

    @property
    def name(self) -> str:
        return f"{self.spec.role} {self.target.destination}"


def _launch_script(node: _Node) -> str:
    """Shell that starts the node's ``ray start`` detached, in its own session, and prints its pid."""
    spec = node.spec
    return f"cd {shlex.quote(node.folder)} || exit 1\n" + detached_script(
        spec.command(), spec.environment_overrides(), f"{node.folder}/{spec.role}.log",
        removals=spec.environment_removals, path_prefix=spec.bin_dir or "", pid_file=f"{node.folder}/{spec.role}.pid")


def _stop_script(node: _Node, grace_s: int = STOP_GRACE_S) -> str:
    """Shell that stops the node's ``ray start`` (SIGTERM, then SIGKILL its session) and deletes its folder."""
    return stop_node_script(node.folder, node.pid, grace_s)


def stop_node_script(folder: str, pid: int | None, grace_s: int = STOP_GRACE_S) -> str:
    folder = shlex.quote(folder)
    pid = int(pid) if pid else 0
    kill_session = (f"pkill -KILL -s {pid} 2>/dev/null; kill -KILL -- -{pid} 2>/dev/null; " if pid else "")
    wait = (f"kill -TERM {pid} 2>/dev/null; i=0; while kill -0 {pid} 2>/dev/null && [ $i -lt {grace_s * 5} ]; "
            f"do sleep 0.2; i=$((i+1)); done; " if pid else "")
    return f"{wait}{kill_session}rm -rf -- {folder}; true"


def _end_all(nodes: list[_Node], tunnel: SSHTunnel | None) -> list[str]:
    """Stop workers, then the head; close the tunnel. Returns what failed. Never references the cluster."""
    failures = []
    for node in reversed(nodes):
        if not node.prepared:
            continue
        try:
            run_remote(node.target, _stop_script(node), timeout_s=90)
            node.pid, node.prepared = None, False
        except SSHError as error:
            failures.append(f"{node.name}: {error}")
    if tunnel is not None:
        tunnel.close()
    return failures


class SSHCluster(SSHReachedCluster):
    """A Ray cluster this object starts on machines you reach over SSH.

    Args:
        head: ``"user@host"`` or ``"user@host:port"`` of the head machine (or an :class:`SSHTarget`).
        workers: the same for each worker machine.
        ssh_port, identity_file, known_hosts_file, host_key_policy: how to SSH (see :class:`SSHTarget`);
            a port in a destination wins over ``ssh_port``.
        private_ip: the head's private IP, where Ray listens and workers connect. Default: the head's
            host when it is a private IP literal. ``127.0.0.1`` (a head reached over loopback, no
            workers) keeps every Ray port on loopback.
        worker_private_ips: each worker's private IP; default: its host when a private IP literal.
        num_cpus, num_gpus: per node; default: what Ray detects.
        ray_executable: the ``ray`` command on the nodes (a non-interactive ssh session has a short
            PATH: give the full path of a virtualenv's ``ray``).
        head_ports, worker_ports: Ray's ports (default Ray's); nodes sharing a machine need distinct ones.
        start_timeout_s: how long the nodes may take to come up.
        keep_running: leave the nodes running when this process exits without ``stop()``.
    """

    owns_nodes = True

    def __init__(self, head: "str | SSHTarget", workers: Sequence["str | SSHTarget"] = (), *, ssh_port: int = 22,
                 identity_file: str | None = None, known_hosts_file: str | None = None,
                 host_key_policy: HostKeyPolicy = "accept-new", private_ip: str | None = None,
                 worker_private_ips: Sequence[str] | None = None, num_cpus: int | None = None,
                 num_gpus: int | None = None, ray_executable: str = "ray", head_ports: RayPorts | None = None,
                 worker_ports: Sequence[RayPorts] | None = None, start_timeout_s: float = 180.0,
                 keep_running: bool = False) -> None:
        if isinstance(workers, str):
            raise ConfigurationError(f"workers={workers!r}: pass a list of destinations, e.g. ['user@10.0.0.6'].")
        options = dict(port=ssh_port, identity_file=identity_file, known_hosts_file=known_hosts_file,
                       host_key_policy=host_key_policy)
        head_target = SSHTarget.parse(head, **options)
        worker_targets = [SSHTarget.parse(worker, **options) for worker in workers]
        if worker_private_ips is not None and len(worker_private_ips) != len(worker_targets):
            raise ConfigurationError(
                f"worker_private_ips has {len(worker_private_ips)} addresses for {len(worker_targets)} workers.")
        if worker_ports is not None and len(worker_ports) != len(worker_targets):
            raise ConfigurationError(f"worker_ports has {len(worker_ports)} entries for {len(worker_targets)} workers.")
        head_ip = self._private_ip(head_target, private_ip, "private_ip")
        if worker_targets and ipaddress.ip_address(head_ip).is_loopback:
            raise ConfigurationError(
                f"The head's private IP is {head_ip}, which workers cannot reach: pass private_ip= the head's "
                f"address on the network the workers share with it.")
        ray_executable = ray_executable.strip()
        if not ray_executable or any(c in ray_executable for c in "\n;&|`$"):
            raise ConfigurationError(f"ray_executable={ray_executable!r}: give the path of the `ray` command.")
        suffix = secrets.token_hex(4)
        head_spec = RayNodeSpec("head", head_ip, f"/tmp/gp-{suffix}h/token", ports=head_ports or RayPorts(),
                                num_cpus=num_cpus, num_gpus=num_gpus, temp_dir=f"/tmp/gp-{suffix}h/r",
                                ray_executable=ray_executable)
        self._nodes = [_Node(head_target, head_spec, f"/tmp/gp-{suffix}h")]
        for index, target in enumerate(worker_targets):
            ip = self._private_ip(target, worker_private_ips[index] if worker_private_ips else None,
                                  f"worker_private_ips[{index}]")
            folder = f"/tmp/gp-{suffix}w{index}"  # short: Ray's socket paths are length-limited
            spec = RayNodeSpec("worker", ip, f"{folder}/token", head_address=head_spec.gcs_address,
                               ports=worker_ports[index] if worker_ports else RayPorts(), num_cpus=num_cpus,
                               num_gpus=num_gpus, temp_dir=f"{folder}/r", ray_executable=ray_executable)
            self._nodes.append(_Node(target, spec, folder))
        self.start_timeout_s = start_timeout_s
        self.keep_running = keep_running
        self._token: str | None = None
        self._tunnel: SSHTunnel | None = None
        self._finalizer: weakref.finalize | None = None

    @staticmethod
    def _private_ip(target: SSHTarget, given: str | None, name: str) -> str:
        if given:
            return check_node_ip(given, name)
        try:
            address = ipaddress.ip_address(target.host)
        except ValueError:
            address = None
        if address is None or address.is_global:
            raise ConfigurationError(
                f"{name} is needed for {target.destination}: Ray must listen on the machine's private IP, "
                f"and {target.host!r} is not a private IP address. Pass {name}='10.x.y.z' (see `ip addr`).")
        return check_node_ip(str(address), name)

    @property
    def head(self) -> SSHTarget:
        return self._nodes[0].target

    @property
    def workers(self) -> list[SSHTarget]:
        return [node.target for node in self._nodes[1:]]

    def __repr__(self) -> str:  # no token
        workers = ", ".join(repr(t.destination) for t in self.workers)
        return f"SSHCluster(head={self.head.destination!r}, workers=[{workers}])"

    def __reduce__(self):
        raise TypeError("an SSHCluster holds the cluster's Ray token and its SSH processes; it cannot be "
                        "pickled. Pass its endpoint's URL and the token through your own secret channel.")

    @property
    def started(self) -> bool:
        return self._token is not None and self._tunnel is not None and self._tunnel.is_open

    def start(self) -> None:
        if self.started:
            return
        try:
            self._start()
        except BaseException:
            self.stop(raise_errors=False)
            raise

    def _start(self) -> None:
        for node in self._nodes:  # everything that can be wrong is found before anything starts
            self._prepare(node)
        self._token = generate_token()
        deliver_token([(node.target, node.spec.token_file) for node in self._nodes], self._token)
        head = self._nodes[0]
        if not self.keep_running:  # nodes must not outlive this process by accident
            self._finalizer = weakref.finalize(self, _end_all, self._nodes, None)
        self._launch(head)
        open_dashboard_tunnel(head.target, head.spec.dashboard_port, self.start_timeout_s, self._failed_node,
                              opened=lambda tunnel: setattr(self, "_tunnel", tunnel))
        self._wait(1)
        for node in self._nodes[1:]:
            self._launch(node)
        if len(self._nodes) > 1:
            self._wait(len(self._nodes))
        log.info("Ray is up on %r; dashboard tunnelled to %s", self, self._tunnel.local_address)

    def _prepare(self, node: _Node) -> None:
        ray = shlex.quote(node.spec.ray_executable)
        check = (f"command -v {ray} >/dev/null 2>&1 || {{ echo 'ray_missing' >&2; exit 3; }}; "
                 f"command -v setsid >/dev/null 2>&1 || {{ echo 'setsid_missing' >&2; exit 4; }}; "
                 f"mkdir -m 700 {shlex.quote(node.folder)}")
        try:
            run_remote(node.target, check)
        except SSHError as error:
            if "ray_missing" in str(error):
                raise ConfigurationError(
                    f"{node.spec.ray_executable!r} is not a command on {node.target.destination}: install Ray "
                    f"there (the same version as here) or pass ray_executable='/path/to/venv/bin/ray'.") from None
            if "setsid_missing" in str(error):
                raise ConfigurationError(f"{node.target.destination} has no `setsid` (util-linux): install it.") from None
            raise
        node.prepared = True

    def _launch(self, node: _Node) -> None:
        result = run_remote(node.target, _launch_script(node))
        node.pid = int(result.stdout.strip().splitlines()[-1])
        log.info("started Ray %s (pid %d)", node.name, node.pid)

    def _failed_node(self) -> str | None:
        """Why a node's ``ray start`` is gone, with its log's tail; None while all live."""
        for node in self._nodes:
            if node.pid is None:
                continue
            result = run_remote(node.target, f"kill -0 {node.pid} 2>/dev/null && echo alive || "
                                             f"tail -n 25 {shlex.quote(node.folder + '/' + node.spec.role + '.log')}",
                                check=False)
            if not result.stdout.startswith("alive"):
                node.pid = None
                return f"Ray's {node.name} exited:\n{result.stdout.strip()}"
        return None

    def _wait(self, count: int) -> None:
        wait_for_nodes_and_gpus(f"http://{self._tunnel.local_address}", self._token, count, 0,
                                self.start_timeout_s, self._failed_node)

    def endpoint(self) -> Endpoint:
        if not self.started:
            raise GpuProxyError(f"{self!r} is not started: call start() (or use it in a with block) first.")
        return Endpoint(f"http://{self._tunnel.local_address}", self._token)

    def resources(self) -> dict[str, float]:
        from gpu_proxy.clusters.ray_cluster import RayCluster

        endpoint = self.endpoint()
        return RayCluster(endpoint.dashboard_url, token=endpoint.token).resources()

    def saved_state(self) -> dict:
        """What `gpu-proxy up ssh` keeps to reach these nodes later and to stop them (never the token)."""
        head = self._nodes[0].target
        return {"head": head.destination, "dashboard_port": self._nodes[0].spec.dashboard_port,
                "identity_file": head.identity_file, "known_hosts_file": head.known_hosts_file,
                "host_key_policy": head.host_key_policy,
                "nodes": [{"destination": n.target.destination, "folder": n.folder, "pid": n.pid}
                          for n in self._nodes]}

    def ssh_head(self) -> SSHTarget:
        return self._nodes[0].target

    @property
    def data_root(self) -> str:  # type: ignore[override]  # inside the head's own folder, removed by stop()
        return f"{self._nodes[0].folder}/runs"

    @property
    def token(self) -> str | None:
        return self._token

    def stop(self, raise_errors: bool = True) -> None:
        """Stop the Ray processes this object started, delete their folders, close the tunnel."""
        failures = _end_all(self._nodes, self._tunnel)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._tunnel = None
        self._token = None
        if failures and raise_errors:
            raise RayNodeError("Could not stop every Ray node; stop them by hand:\n" + "\n".join(failures))


def stop_saved_nodes(state: dict) -> None:
    """Stop nodes an earlier process started with ``keep_running=True`` (workers first, then the head)."""
    failures = []
    for node in reversed(state["nodes"]):
        target = SSHTarget.parse(node["destination"], identity_file=state.get("identity_file"),
                                 known_hosts_file=state.get("known_hosts_file"),
                                 host_key_policy=state.get("host_key_policy", "accept-new"))
        try:
            run_remote(target, stop_node_script(node["folder"], node["pid"]), timeout_s=90)
        except SSHError as error:
            failures.append(f"{node['destination']}: {error}")
    if failures:
        raise RayNodeError("Could not stop every Ray node; stop them by hand:\n" + "\n".join(failures))
