"""Home's side of a cluster's run server: find or start it, run a spec on it, ask it for its state.

The server is a Ray Job (:mod:`gpu_proxy.runs.server`) tagged with a key: the versions home runs
and the address it listens on, so a home never talks to a server of other code. Home proves it
may use the server with a key of its own, made per process and stored on the cluster through the
dashboard (:mod:`gpu_proxy.runs.cluster_kv`); the Jobs API tells home where the server listens
(the first line of its log). ``JobsCluster.server_address`` turns that address into one home can
reach (a cluster behind SSH tunnels it).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import secrets
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gpu_proxy import events, shipping
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.events import Event
from gpu_proxy.runs import cluster_kv, wire
from gpu_proxy.runs.control import RunControl, StopRequest
from gpu_proxy.runs.heartbeat import INTERVAL_S
from gpu_proxy.runs.server import KEY_KIND, READY_MARKER, versions
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.versions import FRAMEWORKS, check_same_versions, install_command, mismatches, source_digest

from gpu_proxy.clusters.base import ServerUnreachable

if TYPE_CHECKING:
    from gpu_proxy.clusters.base import JobsCluster

START_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0
ENTRYPOINT = "python -m gpu_proxy.runs.server --key {key} --host {host}"

_HOME_KEY = secrets.token_bytes(32)  # this process's; never written to disk, pickled or logged
_lock = threading.Lock()
_registered: set[str] = set()  # dashboards that hold this process's key
_servers: dict[tuple[str, str], tuple[str, int]] = {}  # (dashboard, server key) -> where it listens


def _source_digest() -> str:
    """Home's gpu-proxy code (all three packages: :func:`gpu_proxy.versions.source_digest`), so a server
    whose workers imported other (edited) code is never reused: pooled workers keep this library's modules
    between runs."""
    return source_digest(Path(__file__).resolve().parents[2])


_DIGEST: str | None = None


def server_key(host: str) -> str:
    global _DIGEST
    if _DIGEST is None:
        _DIGEST = _source_digest()
    text = json.dumps([versions(), _DIGEST, host], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class ServerClient:
    """The run server of one cluster, as this home sees it."""

    def __init__(self, cluster: "JobsCluster") -> None:
        self._cluster = cluster
        self._endpoint = cluster.endpoint()
        self._host = cluster.server_host()
        self.key = server_key(self._host)

    # -- finding and starting ------------------------------------------------------------------

    def connect(self) -> tuple[socket.socket, dict[str, Any]]:
        """An authenticated connection to the server, started first if none runs; and its hello."""
        self._register_key()
        cache = (self._endpoint.dashboard_url, self.key)
        address = _servers.get(cache)
        for attempt in range(2):
            if address is None:
                with _start_lock(cache):  # two trials at once must not start two servers
                    address = _servers.get(cache) or self._find() or self._start()
                    _servers[cache] = address
            try:
                sock = socket.create_connection(self._cluster.server_address(*address), timeout=CONNECT_TIMEOUT_S)
            except OSError as exc:
                _servers.pop(cache, None)  # it exited (idle) since: find or start another
                if attempt:
                    raise ServerUnreachable(f"the run server of {self._cluster!r} listens at {address[0]}:"
                                            f"{address[1]}, which home cannot reach ({exc})") from None
                address = None
                continue
            try:
                hello = wire.client_handshake(sock, _HOME_KEY)
            except (wire.WireError, OSError):
                sock.close()
                raise
            _check_versions(hello.get("versions", {}))
            sock.settimeout(None)
            return sock, hello
        raise AssertionError("unreachable")

    def _register_key(self) -> None:
        with _lock:
            if self._endpoint.dashboard_url in _registered:
                return
        cluster_kv.put_value(self._endpoint, wire.key_id(_HOME_KEY), KEY_KIND, _HOME_KEY)
        with _lock:
            _registered.add(self._endpoint.dashboard_url)

    def _jobs(self) -> Any:
        from gpu_proxy.clusters.dashboard import DashboardClient

        return DashboardClient(self._endpoint).jobs()

    def _find(self) -> tuple[str, int] | None:
        client = self._jobs()
        for job in client.list_jobs():
            if (job.metadata or {}).get("gpu_proxy_server") == self.key and str(job.status) in ("RUNNING", "JobStatus.RUNNING"):
                address = _ready_address(client.get_job_logs(job.submission_id))
                if address is not None:
                    return address
        return None

    def _start(self) -> tuple[str, int]:
        from ray.job_submission import JobStatus

        client = self._jobs()
        job_id = client.submit_job(
            entrypoint=ENTRYPOINT.format(key=self.key, host=self._host),
            submission_id=f"gpu-proxy-server-{self.key[:12]}-{uuid.uuid4().hex[:6]}",
            metadata={"gpu_proxy_server": self.key}, runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            logs = client.get_job_logs(job_id)
            address = _ready_address(logs)
            if address is not None:
                return address
            if client.get_job_status(job_id) in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED):
                raise GpuProxyError(f"gpu-proxy's run server (Ray Job {job_id}) ended before it listened. "
                                    f"The end of its log:\n{logs[-3000:]}")
            time.sleep(0.1)
        raise GpuProxyError(f"gpu-proxy's run server (Ray Job {job_id}) did not start within {START_TIMEOUT_S:g} s; "
                            f"see `ray job logs {job_id}` on the cluster.")

    # -- requests ------------------------------------------------------------------------------

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """A one-shot request (``status``, ``clear``, ``stop_run``) to the server, if one runs (``{}`` if none)."""
        self._register_key()
        address = _servers.get((self._endpoint.dashboard_url, self.key)) or self._find()
        if address is None:
            return {}
        with socket.create_connection(self._cluster.server_address(*address), timeout=CONNECT_TIMEOUT_S) as sock:
            wire.client_handshake(sock, _HOME_KEY)
            wire.send(sock, {**fields, "op": op})
            return wire.receive(sock)

    def run(self, spec: RunSpec, control: RunControl) -> list[dict[str, Any]]:
        """Run ``spec`` on the server; events reach ``control``. Ctrl-C: a graceful stop, then an abort."""
        sock, _ = self.connect()
        send_lock = threading.Lock()

        def send(message: dict[str, Any]) -> None:
            with send_lock:
                wire.send(sock, message)

        result: dict[str, Any] = {}
        closed = threading.Event()
        try:
            send({"op": "run", "spec": pickle.dumps(spec), "secrets": spec.secrets})
            threading.Thread(target=_read, args=(sock, control, result), daemon=True,
                             name=f"gpu-proxy-read-{spec.name}").start()
            threading.Thread(target=_beat, args=(send, closed), daemon=True,
                             name=f"gpu-proxy-beat-{spec.name}").start()
            stops = 0
            for item in control.items():
                if isinstance(item, StopRequest):
                    stops += 1
                    send({"op": "stop"})  # the first asks for a graceful stop, the second aborts
                    if stops > 1 and control.interrupted:
                        raise KeyboardInterrupt("the remote run was aborted")
        finally:
            closed.set()
            sock.close()
        if "driver_error" in result:
            raise shipping.unpack_exception(result["driver_error"], f"the run server of {self._cluster!r}")
        if "outcomes" not in result:
            raise GpuProxyError(f"the connection to the run server of {self._cluster!r} broke before run "
                                f"{spec.name} ended ({result.get('broken', 'no result')}); the run was stopped.")
        return result["outcomes"]


_start_locks: dict[tuple[str, str], threading.Lock] = {}


def _start_lock(cache: tuple[str, str]) -> threading.Lock:
    with _lock:
        return _start_locks.setdefault(cache, threading.Lock())


def _read(sock: socket.socket, control: RunControl, result: dict[str, Any]) -> None:
    try:
        while True:
            message = wire.receive(sock)
            if "event" in message:
                event = Event.from_dict(message["event"])
                if event.kind == events.RESULT:
                    result.update(event.data)
                    return
                control.post(event)
    except (wire.WireError, OSError) as exc:
        result["broken"] = str(exc)
    finally:
        control.finish()


def _beat(send: Callable[[dict[str, Any]], None], closed: threading.Event) -> None:
    while not closed.wait(INTERVAL_S):
        try:
            send({"op": "beat"})
        except OSError:
            return


def _ready_address(logs: str) -> tuple[str, int] | None:
    for line in logs.splitlines():
        if line.startswith(READY_MARKER):
            found = json.loads(line[len(READY_MARKER):])
            return found["host"], int(found["port"])
    return None


def _check_versions(theirs: dict[str, str]) -> None:
    """The cluster's versions (its run server's hello) against home's: a :class:`VersionSkewError` naming
    both when Python, gpu-proxy, Ray, cloudpickle or a framework both sides have differ (a build tag such as
    ``+cpu`` is no difference; a framework the cluster lacks is not compared: a run of another needs none)."""
    ours, theirs = versions(), dict(theirs)
    if "gpu_proxy" in theirs:  # a server of gpu-proxy 0.1.0 and before named itself so
        theirs.setdefault("gpu-proxy", theirs.pop("gpu_proxy"))
    command = install_command(ours, mismatches(ours, theirs, FRAMEWORKS))
    check_same_versions(ours, theirs, "the cluster", missing_ok=FRAMEWORKS, fix=(
        "A run pickled by one side cannot be trusted to mean the same on the other, and Ray's wire protocol "
        "differs between versions: install home's versions on the cluster's nodes"
        + (f" ({command})" if command else "") + ", or run home with the cluster's."))
