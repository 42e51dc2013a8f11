"""What a run needs from a cluster.

A cluster is a place where runs execute, and it knows how: the embedded cluster runs the
supervisor in this process (:class:`~gpu_proxy.clusters.local.LocalCluster`); every cluster with
a dashboard runs it as a Ray Job (:class:`JobsCluster`); a serverless endpoint runs it inside
its worker. Each also chooses the run's data plane (:mod:`gpu_proxy.dataplane`), how the run's
bulky bytes travel between home and its nodes.

Every cloud or machine kind implements the same few methods: ``start`` (launch or connect,
idempotent), ``resources``, ``stop`` (tear down what this object started), ``data_plane`` and
``execute``; a cluster with a dashboard implements ``endpoint`` and inherits the rest.

While a run executes, the cluster sees its :class:`~gpu_proxy.runs.control.RunControl` (see
``active_runs``): a cluster that meters money adds cost events to the run's stream and stops the
run gracefully when its budget is spent.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from gpu_proxy.dataplane.base import DataPlane
    from gpu_proxy.ssh import SSHTarget
    from gpu_proxy.runs.control import RunControl
    from gpu_proxy.runs.spec import RunSpec

from gpu_proxy.errors import GpuProxyError

log = logging.getLogger(__name__)


class ServerUnreachable(GpuProxyError):
    """The cluster's run server runs, but home cannot connect to its port (a firewall, say)."""


# Runs executing now, per cluster object. Kept outside the objects: clusters travel in pickles
# (inside a Trainer's strategy) and a lock cannot.
_ACTIVE_RUNS: dict[int, list["RunControl"]] = {}
_ACTIVE_LOCK = threading.Lock()
_SERVER_TUNNELS: dict[tuple[int, str, int], Any] = {}  # (cluster object, host, port) -> SSHTunnel


@dataclass(frozen=True)
class Endpoint:
    """How home reaches a running cluster's Jobs API (through a tunnel when the cluster is remote)."""

    dashboard_url: str
    token: str | None = field(default=None, repr=False)  # the Ray auth token; never printed

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def __reduce__(self):  # secrets never enter a pickle
        raise TypeError("an Endpoint holds a secret token and cannot be pickled")


def all_active_runs() -> list["RunControl"]:
    """Every run home is executing now, on any cluster object (a sweep's trials may each have their own)."""
    with _ACTIVE_LOCK:
        return [control for runs in _ACTIVE_RUNS.values() for control in runs]


class Cluster(abc.ABC):
    """A Ray cluster that runs can execute on."""

    #: True when this object started the cluster's nodes and so must tear them down.
    owns_nodes: bool = False

    @abc.abstractmethod
    def start(self) -> None:
        """Launch or connect to the cluster. Idempotent."""

    @abc.abstractmethod
    def resources(self) -> dict[str, float]:
        """Total resources of the cluster's alive nodes, e.g. ``{"CPU": 16.0, "GPU": 8.0}``."""

    def dashboard_url(self) -> str | None:
        return None

    def stop(self) -> None:
        """Tear down what this object started (nodes, tunnels). Default: nothing."""

    def check_run(self, spec: "RunSpec") -> None:
        """Raise before anything is sent when ``spec`` can never run here. Default: the supervisor checks."""

    @abc.abstractmethod
    def data_plane(self, spec: "RunSpec") -> "DataPlane":
        """Home's half of the data plane that ``spec``'s payload and results travel on."""

    @abc.abstractmethod
    def execute(self, spec: "RunSpec", control: "RunControl") -> list[dict[str, Any]]:
        """Run ``spec`` (its payload already sent) to its end; return each rank's outcome, relaying
        events and stop requests through ``control``."""

    def submit_detached(self, spec: "RunSpec") -> str:
        """Start ``spec`` and return its run id at once; the run goes on without home."""
        from gpu_proxy.errors import ConfigurationError

        raise ConfigurationError(
            f"detach=True needs a cluster that outlives this process; {self!r} does not. Pass "
            "cluster='http://host:8265' (or a saved cluster name).")

    @contextlib.contextmanager
    def running(self, control: "RunControl") -> Iterator[None]:
        """Mark ``control``'s run as executing on this cluster for the duration of the block."""
        with _ACTIVE_LOCK:
            _ACTIVE_RUNS.setdefault(id(self), []).append(control)
        try:
            yield
        finally:
            with _ACTIVE_LOCK:
                runs = _ACTIVE_RUNS[id(self)]
                runs.remove(control)
                if not runs:
                    del _ACTIVE_RUNS[id(self)]

    def active_runs(self) -> list["RunControl"]:
        """The runs home is executing on this cluster now (any thread may ask)."""
        with _ACTIVE_LOCK:
            return list(_ACTIVE_RUNS.get(id(self), ()))

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class JobsCluster(Cluster):
    """A Ray cluster reached through its dashboard: each run is a Ray Job, supervised by its driver.

    The data plane is a staging URL when the run has one (``staging_dir``), else the Jobs API up
    to its limit; clusters reached over SSH override :meth:`data_plane` to stream over SSH.
    """

    @abc.abstractmethod
    def endpoint(self) -> Endpoint:
        """The Jobs API to submit runs to (through a tunnel when the cluster is remote)."""

    def dashboard_url(self) -> str | None:
        return self.endpoint().dashboard_url

    def check_run(self, spec: "RunSpec") -> None:
        """The run's workers against the nodes the dashboard reports: a shortage is said before any upload."""
        from gpu_proxy.clusters.dashboard import DashboardClient
        from gpu_proxy.runs.resources import check_fits

        nodes = [{k: v for k, v in node.get("resources_total", {}).items() if not k.startswith("node:")}
                 for node in DashboardClient(self.endpoint()).alive_nodes()]
        check_fits(spec.num_workers, spec.resources_per_worker, nodes)

    def data_plane(self, spec: "RunSpec") -> "DataPlane":
        if spec.staging_dir:
            from gpu_proxy.dataplane.staging import StagingPlane

            return StagingPlane(spec.name, spec.staging_dir, spec.staging_options)
        from gpu_proxy.dataplane.jobs_api import JobsAPIPlane

        return JobsAPIPlane(spec.name, self.endpoint())

    def execute(self, spec: "RunSpec", control: "RunControl") -> list[dict[str, Any]]:
        """On the cluster's run server (started on first use), whose workers stay warm between runs;
        as a Ray Job of its own when home cannot reach the server's port."""
        from gpu_proxy.runs.server_client import ServerClient

        client = ServerClient(self)
        try:
            return client.run(spec, control)
        except ServerUnreachable as exc:
            log.warning("%s; this run goes as a Ray Job of its own (no warm workers)", exc)
        from gpu_proxy.runs.job import JobRun  # the Jobs SDK is only needed here

        return JobRun.submit(self.endpoint(), spec).follow(control)

    def server_host(self) -> str:
        """The address the run server listens on: the one home reaches the dashboard at."""
        from urllib.parse import urlparse

        return urlparse(self.endpoint().dashboard_url).hostname or "127.0.0.1"

    def server_address(self, host: str, port: int) -> tuple[str, int]:
        """Where home connects to reach the run server listening at ``host:port`` on the head."""
        return host, port

    def submit_detached(self, spec: "RunSpec") -> str:
        from gpu_proxy.runs.job import JobRun

        return JobRun.submit(self.endpoint(), spec).job_id


class SSHReachedCluster(JobsCluster):
    """A Ray cluster whose head this object reaches over SSH: bulky data streams over SSH too."""

    #: Run folders on the head; ``~/`` is the SSH user's home there.
    data_root: str = "~/.cache/gpu-proxy/runs"

    @abc.abstractmethod
    def ssh_head(self) -> "SSHTarget":
        """How to reach the head node (the one Ray Job drivers run on) over SSH."""

    def server_host(self) -> str:
        return "127.0.0.1"  # the head's loopback; home comes in through an SSH tunnel

    def server_address(self, host: str, port: int) -> tuple[str, int]:
        from gpu_proxy.ssh import SSHTunnel

        key = (id(self), host, port)  # kept outside the object, which travels in pickles
        tunnel = _SERVER_TUNNELS.get(key)
        if tunnel is None or not tunnel.is_open:
            tunnel = _SERVER_TUNNELS[key] = SSHTunnel(self.ssh_head(), port, remote_host=host).open()
        local_host, _, local_port = tunnel.local_address.rpartition(":")
        return local_host, int(local_port)

    def data_plane(self, spec: "RunSpec") -> "DataPlane":
        from gpu_proxy.dataplane.ssh import SSHPlane, resolve_root

        target = self.ssh_head()
        resolved = getattr(self, "_resolved_data_root", None)
        if resolved is None or resolved[0] != target:
            resolved = (target, resolve_root(target, self.data_root))
            self._resolved_data_root = resolved
        return SSHPlane(spec.name, target, resolved[1], in_memory=spec.home_grace_s is not None)  # not detached
