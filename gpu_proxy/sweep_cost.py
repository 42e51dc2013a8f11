"""What a sweep's trials cost on a metered cluster, and whether the cluster's budget is spent.

A metered cluster (``RunPodCluster``, a saved RunPod cluster, ``LauncherCluster``) reports its
spend so far with ``cost()`` (``spent_usd``, ``usd_per_hour``, ``budget_usd``); it bills the
machines, not the runs. So :class:`CostLedger` reads that spend whenever a trial starts or ends
and a few times a second in between, and splits each increase evenly among the trials running
while it accrued: a trial's share is its ``cost_usd``; spend while no trial runs (between trials,
before the first) counts for the sweep only.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)


class CostLedger:
    """The spend of ``cluster`` during a sweep, per trial. Does nothing for a cluster without ``cost()``."""

    def __init__(self, cluster: Any) -> None:
        self._cluster = cluster
        self._read = getattr(cluster, "cost", None)
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}  # trial number -> its share so far
        self._first: float | None = None  # the first reading: spend before it is not the sweep's
        self._last: float | None = None

    @property
    def metered(self) -> bool:
        return callable(self._read)

    def sample(self) -> None:
        """Read the spend now; split what accrued since the last reading among the running trials."""
        spent = self._spent()
        if spent is None:
            return
        with self._lock:
            if self._last is None:
                self._first = self._last = spent
                return
            accrued, self._last = max(spent - self._last, 0.0), spent
            for number in self._running:
                self._running[number] += accrued / len(self._running)

    def trial_started(self, number: int) -> None:
        self.sample()
        with self._lock:
            self._running[number] = 0.0

    def trial_ended(self, number: int) -> float | None:
        """The trial's share of the spend, USD (None: the cluster does not meter)."""
        self.sample()
        with self._lock:
            share = self._running.pop(number, 0.0)
        return share if self.metered else None

    def total(self) -> float | None:
        """The spend since the first reading, USD (None: the cluster does not meter)."""
        self.sample()
        if self._first is None:
            return 0.0 if self.metered else None
        return self._last - self._first

    def budget_spent(self) -> bool:
        """Whether the cluster reached its ``budget_usd`` (its meter then ends the machines)."""
        if getattr(self._cluster, "budget_exceeded", False):
            return True
        reading = self._reading()
        budget = reading.get("budget_usd") if reading else None
        return budget is not None and float(reading["spent_usd"]) >= float(budget)

    def _spent(self) -> float | None:
        reading = self._reading()
        return float(reading["spent_usd"]) if reading else None

    def _reading(self) -> dict[str, Any] | None:
        if not self.metered:
            return None
        try:
            return self._read()
        except Exception as error:  # noqa: BLE001 - not started yet, or unreachable: the next reading counts
            log.debug("the cost of %r could not be read: %s", self._cluster, error)
            return None
