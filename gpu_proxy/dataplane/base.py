"""The data plane: how a run's bulky bytes (payload out, results home) travel, one kind per cluster.

Events, logs and small outcomes ride the control plane (the event channel, the Ray Job log).
Anything larger than :data:`INLINE_LIMIT` travels as a package file (:mod:`.package`) through the
run's data plane, which the cluster object chooses (``Cluster.data_plane``):

* the embedded cluster: a folder on this machine that home and the workers share;
* a cluster reached over SSH: a folder on the head node, streamed over ``ssh``;
* a cluster given by address: a staging fsspec URL, or without one the Jobs API itself, up to
  a documented size.

Every kind has the same two halves. :class:`DataPlane` is home's: it sends the payload before the
run is submitted, fetches results after it, and cleans the run's staging area however the run
ended. :class:`ClusterTransport` travels inside the :class:`~gpu_proxy.runs.spec.RunSpec` to the
run's supervisor: it turns the sent payload into a checked file in a folder on the supervisor's
node (``receive``), and makes result files written there reachable from home (``deliver``).
Workers on that node map those files directly; the supervisor relays for workers elsewhere.
"""
from __future__ import annotations

import abc
import os
import shutil
import tempfile
from typing import Any

from gpu_proxy.dataplane.package import Package, PackageError, StoredFile, check_file

#: Where a memory-backed folder lies on Linux.
SHARED_MEMORY = "/dev/shm"
#: Outcomes up to this size stay inline on the control plane.
INLINE_LIMIT = 64 * 1024
#: A detached run's results wait this long for ``attach``; the next run on the same plane removes
#: run folders older than this.
RETENTION_DAYS = 7
PAYLOAD = "payload"


def result_name(rank: int) -> str:
    return f"result-{rank}"


class ClusterTransport(abc.ABC):
    """The supervisor's half of a run's data plane. Picklable; holds no secret itself."""

    #: Result files are not hashed where written and may leave buffers in the payload file (package
    #: invariants 4 and 5): the plane's fetch reads them in place, or hashes them as it streams them.
    results_span_payload = False

    def __init__(self) -> None:
        self.folder: str | None = None

    def open(self) -> str:
        """Make this run's folder on the supervisor's node; return its path."""
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="gpu-proxy-run-")
        return self.folder

    def in_memory(self) -> bool:
        """Whether the run's folder is memory-backed, so that writing a mapped file in place costs
        no disk writeback (the only condition under which a lone worker maps the payload in place)."""
        return self.folder is not None and os.path.realpath(self.folder).startswith(SHARED_MEMORY + "/")

    @abc.abstractmethod
    def receive(self, payload: StoredFile) -> StoredFile:
        """The payload as a checked file in :attr:`folder` (its location is a local path)."""

    def deliver(self, result: StoredFile) -> dict[str, Any]:
        """The outcome fields that let home fetch ``result``, a checked file in :attr:`folder`."""
        return {"stored": result.to_dict()}

    def close(self) -> None:
        """Remove what the supervisor made for the run (not what home still has to fetch)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class SharedFolder(ClusterTransport):
    """A folder home wrote into directly (this machine, or the head over SSH); home cleans it.

    ``arrived_checked``: the file was hashed as it arrived (on the head, as it was written), so
    receiving it checks its size only instead of hashing it a second time.
    ``results_span_payload``: see :attr:`ClusterTransport.results_span_payload`.
    """

    def __init__(self, folder: str, arrived_checked: bool = False, results_span_payload: bool = False) -> None:
        super().__init__()
        self.folder = folder
        self.arrived_checked = arrived_checked
        self.results_span_payload = results_span_payload
        self._payload_spanned = False

    def open(self) -> str:
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        return self.folder

    def receive(self, payload: StoredFile) -> StoredFile:
        check_file(payload.location, payload, size_only=self.arrived_checked)
        return payload

    def deliver(self, result: StoredFile) -> dict[str, Any]:
        self._payload_spanned |= result.spans_of == PAYLOAD
        return super().deliver(result)

    def close(self) -> None:
        payload = os.path.join(self.folder, PAYLOAD)
        if os.path.exists(payload) and not self._payload_spanned:
            os.unlink(payload)  # results stay for home, which removes the folder once it has them


class DataPlane(abc.ABC):
    """Home's half of one run's data plane."""

    def __init__(self, run_name: str) -> None:
        self.run_name = run_name

    def check(self, payload: Package, expected_result_bytes: int = 0) -> None:
        """Raise before anything is submitted if this plane cannot carry the run. Default: no limit."""

    @abc.abstractmethod
    def send(self, payload: Package) -> StoredFile:
        """Put the payload where the cluster side can receive it."""

    @abc.abstractmethod
    def transport(self) -> ClusterTransport:
        """The cluster side, to travel with the run."""

    @abc.abstractmethod
    def fetch(self, result: StoredFile) -> Package:
        """Bring a delivered result home, checked, mapped from a local file."""

    @abc.abstractmethod
    def clean(self) -> None:
        """Remove the run's staging area. Idempotent; called after success, failure and Ctrl-C."""


class InlinePlane(DataPlane):
    """No data plane of its own: the payload rides inside the run and results inside its outcomes.

    For clusters whose execution carries bytes itself (a serverless job's input and stream,
    with its own storage for large runs).
    """

    def send(self, payload: Package) -> StoredFile | None:  # type: ignore[override]
        return None

    def transport(self) -> ClusterTransport | None:  # type: ignore[override]
        return None

    def fetch(self, result: StoredFile) -> Package:
        raise PackageError(f"{result.location}: this cluster returns results inline")

    def clean(self) -> None:
        pass
