"""The cost side of a :class:`RunPodCluster` while it is up: the rate and spend it reports, the cost meter
(:mod:`.meter`: cost events to the runs, the budget stop) and, with ``idle_timeout``, the home heartbeat
that tells the pods' idle watcher home is here."""
from __future__ import annotations

import time

from gpu_proxy.clouds.runpod.meter import CostMeter
from gpu_proxy.clusters.base import Endpoint


class CostState:
    """Mixed into :class:`RunPodCluster`, whose launch state it reads: ``_pods``, ``_launched_at``,
    ``estimate``, ``_query()``, ``_end()``, ``_tunnel_box``, ``_token``, the meter's settings."""

    _meter: CostMeter | None = None
    _heartbeat = None

    def cost_per_hour(self) -> float:
        """What the pods cost per hour, as RunPod last reported them (the catalog estimate before launch)."""
        if self._meter is not None:
            return self._meter.usd_per_hour
        if self._pods:
            return sum(pod.cost_per_hour for pod in self._pods)
        return self.estimate.per_hour if self.estimate else 0.0

    def spent_usd(self) -> float:
        """Metered spend since the first pod was created (RunPod bills per second)."""
        if self._meter is not None:
            return self._meter.spent_usd()
        if self._launched_at is None:
            return 0.0
        return self.cost_per_hour() * (time.time() - self._launched_at) / 3600

    def cost(self) -> dict[str, float | None]:
        """The cost meter: ``spent_usd``, ``usd_per_hour``, ``budget_usd`` (``gpu-proxy status`` shows it)."""
        return {"spent_usd": self.spent_usd(), "usd_per_hour": self.cost_per_hour(), "budget_usd": self.budget_usd}

    def _pods_rate(self) -> float:
        """USD per hour of the pods now, from RunPod (a pod gone or stopped costs nothing); every member of
        an Instant Cluster counts."""
        return sum(pod.cost_per_hour for pod in self._query().values() if pod is not None and pod.status != "EXITED")

    def _watch(self, spent_usd: float = 0.0) -> None:
        """Start the cost meter and (with ``idle_timeout``) the home heartbeat."""
        self._meter = CostMeter(self, self._pods_rate, interval_s=self.meter_interval_s, spent_usd=spent_usd,
                                budget_usd=self.budget_usd, grace_s=self.budget_grace_s,
                                checkpoint_margin_s=self.checkpoint_margin_s, end=self._end_for_budget,
                                progress=self._progress).start()
        if self.idle_timeout_s is not None:
            from gpu_proxy.runs.heartbeat import HomeHeartbeat

            # While this process holds the cluster, the head's idle watcher sees home (gpu_proxy/runs/heartbeat.py).
            self._heartbeat = HomeHeartbeat(Endpoint(f"http://{self._tunnel_box[0].local_address}", self._token),
                                            f"cluster-{self.name}").start()

    def _end_for_budget(self) -> None:
        self.budget_exceeded = True
        failures = self._end(from_meter=True)
        if failures:
            self._progress("could not terminate: " + "; ".join(failures))

    def _unwatch(self, from_meter: bool = False) -> None:
        if self._heartbeat is not None:
            self._heartbeat.close()
            self._heartbeat = None
        if self._meter is not None and not from_meter:
            self._meter.close()
