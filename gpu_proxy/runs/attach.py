"""Runs submitted to a Ray cluster outlive their home: list them, read their logs, follow them again."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO


from gpu_proxy import events
from gpu_proxy.clusters.base import JobsCluster
from gpu_proxy.clusters.dashboard import DashboardClient
from gpu_proxy.clusters.resolve import ClusterSpec, resolve_cluster
from gpu_proxy.dataplane.base import DataPlane
from gpu_proxy.dataplane.staging import StagingPlane
from gpu_proxy.errors import ConfigurationError, GpuProxyError
from gpu_proxy.events import Event
from gpu_proxy.runs import log_codec
from gpu_proxy.runs.home import fetch, values
from gpu_proxy.runs.job import JobRun
from gpu_proxy.runs.job_driver import STOPPED_MARKER
from gpu_proxy.runs.spec import RunSpec


@dataclass
class RunInfo:
    run_id: str
    status: str
    entrypoint: str
    start_time: float | None
    end_time: float | None


@contextmanager
def _connected(cluster: ClusterSpec) -> Iterator[JobsCluster]:
    """The cluster, its Jobs API kept reachable (its tunnel open) while the block runs."""
    resolved = resolve_cluster(cluster)
    if not isinstance(resolved, JobsCluster):
        raise ConfigurationError(
            "Runs on the embedded local cluster live and die with their Python process; detach, attach, "
            "runs and logs need a Ray cluster given by address or name (cluster='http://host:8265').")
    resolved.start()
    yield resolved


def list_runs(cluster: ClusterSpec) -> list[RunInfo]:
    """Detached runs (Ray Jobs) and the recent runs of the cluster's run server, oldest first."""
    with _connected(cluster) as resolved:
        endpoint = resolved.endpoint()
        jobs = DashboardClient(endpoint).jobs().list_jobs()
        served = _served_runs(resolved)
    runs = served
    for job in jobs:
        if (job.metadata or {}).get("gpu_proxy_run"):
            runs.append(RunInfo(job.submission_id, _status(job), job.entrypoint, (job.start_time or 0) / 1000 or None,
                                (job.end_time or 0) / 1000 or None))
    return sorted(runs, key=lambda r: r.start_time or 0)


def _served_runs(cluster: JobsCluster) -> list[RunInfo]:
    from gpu_proxy.runs.server_client import ServerClient

    try:
        records = ServerClient(cluster).request("status").get("runs", [])
    except (OSError, GpuProxyError):
        return []  # no server reachable: only detached runs to show
    return [RunInfo(r["run_id"], r["status"], "gpu-proxy run server", r.get("start_time"), r.get("end_time"))
            for r in records]


def _status(job: Any) -> str:
    """The job's state, or ``STOPPED (why)`` for a run its driver stopped on its own (home gone)."""
    status = str(job.status.value if hasattr(job.status, "value") else job.status)
    message = job.message or ""
    if STOPPED_MARKER in message:
        return "STOPPED (" + message.split(STOPPED_MARKER, 1)[1].splitlines()[0].strip() + ")"
    return status


def stop_run(run_id: str, cluster: ClusterSpec) -> bool:
    """Ask a run to stop at its next step boundary (as Ctrl-C at its home would); False if it had ended.

    A run of the cluster's run server is stopped there; a detached run through its Ray Job."""
    from gpu_proxy.runs.server_client import ServerClient

    with _connected(cluster) as resolved:
        try:
            served = ServerClient(resolved).request("stop_run", run=run_id)
        except (OSError, GpuProxyError):
            served = {}
        if served.get("found"):
            return bool(served["stopped"])
        return JobRun(resolved.endpoint(), run_id).stop()


def run_events(run_id: str, cluster: ClusterSpec) -> list[Event]:
    """Every event the run has sent so far, in order (from its job log)."""
    with _connected(cluster) as resolved:
        endpoint = resolved.endpoint()
        logs = DashboardClient(endpoint).jobs().get_job_logs(run_id)
    decoder = log_codec.Decoder()
    return [event for line in logs.splitlines() for event in decoder.feed(line)]


class ConsoleRenderer:
    """A plain rendering of a run's events for a terminal: log lines and a line per epoch."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def __call__(self, event: Event) -> None:
        if event.kind == events.LOG:
            self.out.write(f"(rank {event.rank}) {event.data.get('line', '')}\n")
        elif event.kind == events.PROGRESS and event.data.get("hook") in ("on_train_epoch_end", "epoch_end"):
            metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in (event.data.get("metrics") or {}).items())
            self.out.write(f"epoch {event.data.get('epoch')} step {event.data.get('global_step', '')} {metrics}\n")
        elif event.kind == events.STOPPED:
            self.out.write(f"[stopped] {event.data.get('reason')}\n")
        elif event.kind in (events.RESTART, events.WARNING, events.CHECKPOINT):
            self.out.write(f"[{event.kind}] {event.data}\n")
        self.out.flush()


def attach(run_id: str, cluster: ClusterSpec, on_event: Callable[[Event], None] | None = None,
           storage_options: dict[str, Any] | None = None) -> list[Any]:
    """Replay a run's events from the start, follow it live, and return each rank's result.

    Ctrl-C stops watching; the run goes on (``gpu-proxy stop`` stops it). A finished run's large results wait on its data plane (the head's disk, or its staging URL,
    read with ``storage_options``); they are brought home and then removed there.
    """
    with _connected(cluster) as resolved:
        outcomes = JobRun(resolved.endpoint(), run_id).follow(on_event or ConsoleRenderer(), watch_only=True)
        plane = _plane_of(resolved, run_id, outcomes, storage_options)
        try:
            outcomes = fetch(plane, outcomes)
        finally:
            plane.clean()
    return values(outcomes)


def _plane_of(cluster: JobsCluster, run_id: str, outcomes: list[dict[str, Any]],
              storage_options: dict[str, Any] | None) -> DataPlane:
    """The data plane the run's results wait on: its staging URL if they name one, else the cluster's."""
    staged = [o["stored"]["location"] for o in outcomes if "://" in o.get("stored", {}).get("location", "")]
    if staged:  # <staging_dir>/<run>/result-N
        return StagingPlane(run_id, staged[0].rsplit("/", 2)[0], storage_options)
    return cluster.data_plane(RunSpec(payload=None, num_workers=1, name=run_id))
