"""What a run needs from a cluster.

A cluster is a place where runs execute. There are two ways a run executes:

* in this process, on an embedded Ray cluster (``endpoint()`` returns ``None``); the run's
  supervisor runs here and there is nothing to submit;
* as a Ray Job on a cluster reached through its dashboard (``endpoint()`` returns an
  :class:`Endpoint`); the supervisor runs as the job's driver on the cluster.

Every cloud or machine kind implements the same few methods: ``start`` (launch or connect,
idempotent), ``endpoint``, ``resources``, ``stop`` (tear down what this object started).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field


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

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
