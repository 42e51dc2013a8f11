"""The home side of a run: execute it on a cluster, relay events to the caller, raise its errors."""
from __future__ import annotations

import threading
from typing import Any, Callable

from gpu_proxy import shipping
from gpu_proxy.clusters.base import Cluster
from gpu_proxy.errors import RunStoppedError, WorkerLostError
from gpu_proxy.events import Event
from gpu_proxy.runs.control import RunControl, StopRequest
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.runs.supervisor import StopSignal, supervise

def execute(cluster: Cluster, spec: RunSpec, on_event: Callable[[Event], None]) -> list[dict[str, Any]]:
    """Run ``spec`` and return each rank's outcome; ``on_event`` is called here, on this thread.

    Ctrl-C asks the workers to stop at their next step boundary; a second Ctrl-C aborts them.
    Either way ``KeyboardInterrupt`` is raised here once the workers are gone. A cluster may stop
    the run itself (its budget spent): then :class:`RunStoppedError` is raised, carrying the
    outcomes.
    """
    cluster.start()
    control = RunControl(on_event, spec.name)
    with cluster.running(control):
        outcomes = cluster.execute(spec, control)
    if control.interrupted:
        raise KeyboardInterrupt("the remote run was stopped")
    if control.stop_reason is not None:
        raise RunStoppedError(control.stop_reason, outcomes)
    return outcomes


def execute_here_or_as_job(cluster: Cluster, spec: RunSpec, control: RunControl) -> list[dict[str, Any]]:
    """How runs execute on a Ray cluster: in this process when it is embedded, else as a Ray Job."""
    endpoint = cluster.endpoint()
    if endpoint is None:
        return _execute_in_process(spec, control)
    from gpu_proxy.runs.job import JobRun  # the Jobs SDK is only needed for remote clusters

    return JobRun.submit(endpoint, spec).follow(control)


def submit_detached(cluster: Cluster, spec: RunSpec) -> str:
    """Submit ``spec`` to a Ray cluster and return its run id at once; the run goes on without home."""
    cluster.start()
    endpoint = cluster.endpoint()
    if endpoint is None:
        from gpu_proxy.errors import ConfigurationError

        raise ConfigurationError(
            "detach=True needs a cluster that outlives this process; the embedded local cluster does not. "
            "Pass cluster='http://host:8265' (or a saved cluster name).")
    from gpu_proxy.runs.job import JobRun

    return JobRun.submit(endpoint, spec).job_id


def _execute_in_process(spec: RunSpec, control: RunControl) -> list[dict[str, Any]]:
    stop = StopSignal()
    result: dict[str, Any] = {}

    def supervise_in_background() -> None:
        try:
            result["outcomes"] = supervise(spec, control.post, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = exc
        finally:
            control.finish()

    thread = threading.Thread(target=supervise_in_background, name=f"gpu-proxy-{spec.name}", daemon=True)
    thread.start()
    for item in control.items():
        if isinstance(item, StopRequest):
            stop.request()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["outcomes"]


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
    return [shipping.loads(o["value"]) for o in outcomes]
