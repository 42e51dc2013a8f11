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
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from gpu_proxy import events
from gpu_proxy.clusters.base import Cluster
from gpu_proxy.events import Event

log = logging.getLogger(__name__)


class CostMeter:
    """Args:
        cluster: whose ``active_runs()`` get the cost events and the stop request.
        rate: the pods' cost now, USD per hour (called once per tick; may raise, then the last rate holds).
        spent_usd: spend before this meter started (a saved cluster re-attached later).
        budget_usd: None for no budget.
        end: terminates the pods (called once, from the meter's thread, when the budget is spent).
    """

    def __init__(self, cluster: Cluster, rate: Callable[[], float], *, interval_s: float = 30.0,
                 spent_usd: float = 0.0, budget_usd: float | None = None, grace_s: float = 180.0,
                 checkpoint_margin_s: float = 60.0, end: Callable[[], None] = lambda: None,
                 progress: Callable[[str], None] = lambda message: None) -> None:
        self.cluster = cluster
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
        self._read_rate()
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
        if self.budget_usd is None or self.budget_reached:
            return
        margin = rate * (self.interval_s + self.checkpoint_margin_s) / 3600
        if spent + margin >= self.budget_usd:
            self._stop_for_budget(spent, rate, margin)

    def _stop_for_budget(self, spent: float, rate: float, margin: float) -> None:
        self.budget_reached = True
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
        else:
            self._progress(f"{reason}; no run is executing: terminating the pods")
        self._end()
