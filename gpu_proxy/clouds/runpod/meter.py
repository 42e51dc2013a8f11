"""The cost meter of a RunPod cluster while home holds it: spend, cost events, and the budget stop.

Every tick (``interval_s``) the meter reads what the pods cost now (RunPod's ``cost`` per pod, in
USD per hour; billing is per second), adds ``rate x elapsed`` to the spend, and posts a
``cost`` event to every run executing on the cluster (``Cluster.active_runs()``), so the run's
loggers and ``gpu-proxy status`` show it.

``budget_usd``: the budget must hold *after* the run has committed a checkpoint, so the meter
acts early, when ``spent + rate x (one tick + checkpoint_margin_s)`` reaches it. It then asks
every active run to stop at its next step boundary (the run saves a checkpoint, home raises
``RunStoppedError``), waits up to ``grace_s`` for the runs to end, and only then calls ``end``
(terminate the pods). With no run executing it calls ``end`` at once.

Runs the cluster executes on its own (a Ray Tune sweep submitted as a Ray Job: its trials' runs are
the trainables', not home's) are out of home's sight, so each tick the meter also publishes its
reading to the cluster (:func:`publish_reading`: one cluster-level key through the Jobs API, as home's
heartbeat), ``budget_reached`` included, and publishes the budget's before its grace wait; the Tune
callbacks read it there (:mod:`gpu_proxy.tune_cost`). With the budget reached, the grace wait also
lasts while the cluster runs Ray Jobs of its own (a sweep's driver, which ends once its trials have
stopped), up to ``grace_s``. A reading that cannot be published is skipped, like a missed heartbeat;
the retries are the HTTP transport's (:mod:`gpu_proxy.http_transport`): a tick's are the dashboard's
own, the budget's reading has more (:data:`BUDGET_READING_RETRIES`).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

from gpu_proxy import events
from gpu_proxy.clusters.base import Cluster
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.events import Event
from gpu_proxy.http_transport import RetryPolicy

log = logging.getLogger(__name__)

#: The budget's reading is the only warning the cluster's own runs (a Tune sweep's trials) get, so beyond
#: the dashboard's 502/503/504 its PUT (one key overwritten: safe to repeat) is tried again after a 429,
#: any 5xx, a refused or dropped connection and a timeout: 3 attempts, the waits within about a second.
BUDGET_READING_RETRIES = RetryPolicy(max_retries=2, backoff_s=0.25, max_backoff_s=1.0)


class CostMeter:
    """Args:
        cluster: whose ``active_runs()`` get the cost events and the stop request.
        rate: the pods' cost now, USD per hour (called once per tick; may raise, then the last rate holds).
        spent_usd: spend before this meter started (a saved cluster re-attached later).
        budget_usd: None for no budget.
        end: terminates the pods (called once, from the meter's thread, when the budget is spent).
        publish: where each reading goes for the cluster's own runs (JSON bytes), tried once; default
            :func:`publish_reading` to ``cluster.endpoint()`` when the cluster has one, with the HTTP
            transport's retries.
    """

    def __init__(self, cluster: Cluster, rate: Callable[[], float], *, interval_s: float = 30.0,
                 spent_usd: float = 0.0, budget_usd: float | None = None, grace_s: float = 180.0,
                 checkpoint_margin_s: float = 60.0, end: Callable[[], None] = lambda: None,
                 progress: Callable[[str], None] = lambda message: None,
                 publish: Callable[[bytes], None] | None = None) -> None:
        self.cluster = cluster
        self._publish_to = publish  # None: publish_reading(cluster, ...)
        self._rate_source = rate
        self.interval_s = interval_s
        self.budget_usd = budget_usd
        self.grace_s = grace_s
        self.checkpoint_margin_s = checkpoint_margin_s
        self._end = end
        self._progress = progress
        self._spent = spent_usd
        self._rate = 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.budget_reached = False
        self.stop_reason: str | None = None

    # -- reading -----------------------------------------------------------------------------------------

    @property
    def usd_per_hour(self) -> float:
        return self._rate

    def spent_usd(self) -> float:
        """Spend so far, up to now (between ticks at the last rate read)."""
        with self._lock:
            return self._spent + self._rate * (time.monotonic() - self._last) / 3600

    # -- running -----------------------------------------------------------------------------------------

    def start(self) -> "CostMeter":
        rate = self._read_rate()
        self._publish(self._reading(self.spent_usd(), rate))  # a new home's reading replaces any an earlier one left
        self._thread = threading.Thread(target=self._run, name="gpu-proxy-runpod-meter", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()

    def _read_rate(self) -> float:
        try:
            rate = float(self._rate_source())
        except Exception as error:  # noqa: BLE001 - RunPod unreachable for a moment: keep the last rate
            log.warning("RunPod cost meter: could not read the pods' cost (%s); using $%.2f/h", error, self._rate)
            return self._rate
        with self._lock:
            now = time.monotonic()
            self._spent += self._rate * (now - self._last) / 3600  # at the old rate up to now
            self._last, self._rate = now, rate
        return rate

    def _run(self) -> None:
        while not self._closed.wait(self.interval_s):
            self.tick()
            if self.budget_reached:
                return

    def tick(self) -> None:
        """One meter reading: cost events to every active run, then the budget check."""
        rate = self._read_rate()
        spent = self.spent_usd()
        data = {"spent_usd": round(spent, 6), "usd_per_hour": rate, "budget_usd": self.budget_usd}
        for control in self.cluster.active_runs():
            control.post(Event(events.COST, data))
        margin = rate * (self.interval_s + self.checkpoint_margin_s) / 3600
        if self.budget_usd is None or self.budget_reached or spent + margin < self.budget_usd:
            self._publish(self._reading(spent, rate))
            return
        self._stop_for_budget(spent, rate, margin)

    def _reading(self, spent: float, rate: float) -> dict:
        """What the cluster's own runs read (gpu_proxy/tune_cost.py): the cost event's fields and the budget's state."""
        return {"spent_usd": round(spent, 6), "usd_per_hour": rate, "budget_usd": self.budget_usd,
                "budget_reached": self.budget_reached}

    def _publish(self, reading: dict, policy: RetryPolicy | None = None) -> None:
        """Publish ``reading``, retried as ``policy`` says (default: the dashboard's); one that still does not
        arrive is a missed tick, as a missed beat."""
        value = json.dumps(reading).encode()
        try:
            if self._publish_to is None:
                publish_reading(self.cluster, value, policy=policy)
            else:
                self._publish_to(value)
        except (OSError, GpuProxyError) as error:  # HTTPCallError is both
            log.debug("RunPod cost meter: the reading did not reach the cluster (%s)", error)

    def _stop_for_budget(self, spent: float, rate: float, margin: float) -> None:
        self.budget_reached = True
        # First, so the cluster's own runs (a Tune sweep's trials) get the grace period to stop too.
        self._publish(self._reading(spent, rate), BUDGET_READING_RETRIES)  # not one to miss: the trials' only warning
        reason = (f"budget_usd={self.budget_usd:g} reached: ${spent:.2f} spent at ${rate:.2f}/hour, and the next "
                  f"${margin:.2f} (one meter tick plus {self.checkpoint_margin_s:g} s for a checkpoint) would pass it")
        self.stop_reason = reason
        runs = self.cluster.active_runs()
        if runs:
            self._progress(f"{reason}; stopping {len(runs)} run(s) at their next step (a checkpoint is committed), "
                           f"then terminating the pods")
            for control in runs:
                control.request_stop(reason)
            deadline = time.monotonic() + self.grace_s
            while self.cluster.active_runs() and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.cluster.active_runs():
                self._progress(f"the run(s) did not stop within {self.grace_s:g} s; terminating the pods anyway")
        elif cluster_jobs_running(self.cluster):
            self._progress(f"{reason}; waiting up to {self.grace_s:g} s for the cluster's Ray Jobs (a Tune sweep "
                           f"stops its trials at their next step), then terminating the pods")
            deadline = time.monotonic() + self.grace_s
            while cluster_jobs_running(self.cluster) and time.monotonic() < deadline:
                time.sleep(0.5)
        else:
            self._progress(f"{reason}; no run is executing: terminating the pods")
        self._end()


def publish_reading(cluster: Cluster, value: bytes, timeout_s: float = 10.0, policy: RetryPolicy | None = None) -> None:
    """Store the meter's reading in ``cluster``'s key-value store (:data:`gpu_proxy.runs.cluster_kv.METER`)
    through the one dashboard client, retrying as ``policy`` says (default: the dashboard's
    ``DASHBOARD_RETRIES``); nothing for a cluster without a Jobs API. Raises ``OSError`` or
    ``GpuProxyError`` when it cannot."""
    endpoint = getattr(cluster, "endpoint", None)
    if endpoint is None:
        return
    from gpu_proxy.clusters.dashboard import DASHBOARD_RETRIES
    from gpu_proxy.runs.cluster_kv import METER, put_value

    put_value(endpoint(), *METER, value, timeout_s=timeout_s, policy=policy or DASHBOARD_RETRIES)


def cluster_jobs_running(cluster: Cluster) -> bool:
    """Whether ``cluster`` runs a Ray Job other than gpu-proxy's run server (False when it cannot say)."""
    endpoint = getattr(cluster, "endpoint", None)
    if endpoint is None:
        return False
    from gpu_proxy.clusters.dashboard import DashboardClient

    try:
        jobs = DashboardClient(endpoint(), timeout_s=5.0).list_jobs()
    except (OSError, ValueError, GpuProxyError):
        return False
    return any(job.get("status") in ("PENDING", "RUNNING") and "gpu_proxy_server" not in (job.get("metadata") or {})
               for job in jobs)
