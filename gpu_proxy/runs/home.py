"""The home side of a run: execute it on a cluster, relay events to the caller, raise its errors."""
from __future__ import annotations

from typing import Any, Callable

from gpu_proxy import shipping
from gpu_proxy.clusters.base import Cluster
from gpu_proxy.dataplane.base import DataPlane
from gpu_proxy.dataplane.package import Package, StoredFile
from gpu_proxy.errors import RunInterrupted, RunStoppedError, WorkerLostError
from gpu_proxy.events import Event
from gpu_proxy.runs.control import RunControl
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.secrets import references


def execute(cluster: Cluster, spec: RunSpec, on_event: Callable[[Event], None]) -> list[dict[str, Any]]:
    """Run ``spec`` and return each rank's outcome; ``on_event`` is called here, on this thread.

    The payload goes out on the cluster's data plane before the run starts and large results come
    home on it; the run's staging area is removed however the run ends. Ctrl-C asks the workers to
    stop at their next step boundary and :class:`RunInterrupted` (a ``KeyboardInterrupt``) is raised
    here with the outcomes, so the caller keeps the state trained so far; a second Ctrl-C aborts them. A cluster may stop the run itself (its budget spent):
    then :class:`RunStoppedError` is raised, carrying the outcomes.
    """
    cluster.start()
    control = RunControl(on_event, spec.name)
    cluster.check_run(spec)
    plane = cluster.data_plane(spec)
    try:
        send(plane, spec)
        with cluster.running(control):
            outcomes = fetch(plane, cluster.execute(spec, control))
    finally:
        plane.clean()
    if control.interrupted:
        raise RunInterrupted("the remote run was stopped", outcomes)
    if control.stop_reason is not None:
        raise RunStoppedError(control.stop_reason, outcomes)
    return outcomes


def send(plane: DataPlane, spec: RunSpec) -> None:
    """Check that ``plane`` can carry the run, then send its payload (before anything is submitted)."""
    plane.check(spec.payload, spec.result_bytes_hint)
    spec.payload_file = plane.send(spec.payload)
    spec.transport = plane.transport()
    spec.secrets.update(references(spec.staging_options))  # the supervisor's half reads staging too


def fetch(plane: DataPlane, outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``outcomes`` with each result the supervisor left on the data plane brought home (a Package)."""
    fetched = []
    for outcome in outcomes:
        if "stored" in outcome:
            outcome = dict(outcome)
            outcome["value"] = plane.fetch(StoredFile.from_dict(outcome.pop("stored")))
        fetched.append(outcome)
    return fetched


def submit_detached(cluster: Cluster, spec: RunSpec) -> str:
    """Submit ``spec`` to a Ray cluster and return its run id at once; the run goes on without home.

    Its results wait on the data plane until ``attach`` brings them home (and then removes them).
    """
    cluster.start()
    cluster.check_run(spec)
    plane = cluster.data_plane(spec)
    try:
        send(plane, spec)
        return cluster.submit_detached(spec)
    except BaseException:
        plane.clean()
        raise


def raise_for_outcomes(outcomes: list[dict[str, Any]]) -> None:
    """Raise the run's error at home.

    A worker process that died (killed, out of memory, node lost) comes first: the errors the other
    ranks then raise (a collective whose peer vanished) are its consequences. A worker that runs its
    job in a child process reports that child's death as a :class:`WorkerLostError`
    (``gpu_proxy_keras/fresh_process.py``); it counts as a death too, whichever rank's error came
    first. Otherwise the first rank's own exception is raised as itself.
    """
    crashed = [o for o in outcomes if ("lost" in o and not o.get("cancelled")) or _reported_lost(o)]
    if crashed:
        raise WorkerLostError(f"{len(crashed)} worker(s) died during the run: {_lost_details(crashed)}")
    # The error that ended the run first is the cause; those that came during the cancel follow from it.
    for outcome in sorted(outcomes, key=lambda o: bool(o.get("ended_during_cancel"))):
        if "error" in outcome:
            raise shipping.unpack_exception(outcome["error"], f"rank {outcome['rank']}")
    lost = [o for o in outcomes if "lost" in o]
    if lost:
        raise WorkerLostError(f"{len(lost)} worker(s) were lost during the run: {_lost_details(lost)}")


_WORKER_LOST = f"{WorkerLostError.__module__}.{WorkerLostError.__qualname__}"


def _reported_lost(outcome: dict[str, Any]) -> bool:
    return "error" in outcome and outcome["error"].get("type") == _WORKER_LOST


def _lost_details(outcomes: list[dict[str, Any]]) -> str:
    return "; ".join(f"rank {o['rank']}: {o['lost'] if 'lost' in o else o['error']['message']}"
                     for o in outcomes)


def values(outcomes: list[dict[str, Any]]) -> list[Any]:
    """Each rank's return value, in rank order (after :func:`raise_for_outcomes`)."""
    raise_for_outcomes(outcomes)
    return [_package(o["value"]).loads() for o in outcomes]


def _package(value: "Package | bytes") -> Package:
    return value if isinstance(value, Package) else Package.from_bytes(value)
