"""What a run needs from a cluster.

A cluster is a place where runs execute. There are two ways a run executes:

* in this process, on an embedded Ray cluster (``endpoint()`` returns ``None``); the run's
  supervisor runs here and there is nothing to submit;
* as a Ray Job on a cluster reached through its dashboard (``endpoint()`` returns an
  :class:`Endpoint`); the supervisor runs as the job's driver on the cluster.

Every cloud or machine kind implements the same few methods: ``start`` (launch or connect,
idempotent), ``endpoint``, ``resources``, ``stop`` (tear down what this object started). A cluster
that runs work some other way (a serverless endpoint) overrides ``execute`` as well.

While a run executes, the cluster sees its :class:`~gpu_proxy.runs.control.RunControl` (see
``active_runs``): a cluster that meters money adds cost events to the run's stream and stops the
run gracefully when its budget is spent.
"""
from __future__ import annotations

import abc
import contextlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from gpu_proxy.runs.control import RunControl
    from gpu_proxy.runs.spec import RunSpec

# Runs executing now, per cluster object. Kept outside the objects: clusters travel in pickles
# (inside a Trainer's strategy) and a lock cannot.
_ACTIVE_RUNS: dict[int, list["RunControl"]] = {}
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Endpoint:
    """How home reaches a running cluster's Jobs API (through a tunnel when the cluster is remote)."""

    dashboard_url: str
    token: str | None = field(default=None, repr=False)  # the Ray auth token; never printed

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def __reduce__(self):  # secrets never enter a pickle
        raise TypeError("an Endpoint holds a secret token and cannot be pickled")


class Cluster(abc.ABC):
    """A Ray cluster that runs can execute on."""

    #: True when this object started the cluster's nodes and so must tear them down.
    owns_nodes: bool = False

    @abc.abstractmethod
    def start(self) -> None:
        """Launch or connect to the cluster. Idempotent."""

    @abc.abstractmethod
    def endpoint(self) -> Endpoint | None:
        """The Jobs API to submit runs to, or ``None`` when runs execute in this process."""

    @abc.abstractmethod
    def resources(self) -> dict[str, float]:
        """Total resources of the cluster's alive nodes, e.g. ``{"CPU": 16.0, "GPU": 8.0}``."""

    def dashboard_url(self) -> str | None:
        endpoint = self.endpoint()
        return endpoint.dashboard_url if endpoint else None

    def stop(self) -> None:
        """Tear down what this object started (nodes, tunnels). Default: nothing."""

    def execute(self, spec: "RunSpec", control: "RunControl") -> list[dict[str, Any]]:
        """Run ``spec`` to its end and return each rank's outcome, relaying through ``control``.

        Default: in this process on an embedded cluster, else as a Ray Job through ``endpoint()``.
        """
        from gpu_proxy.runs.home import execute_here_or_as_job

        return execute_here_or_as_job(self, spec, control)

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
