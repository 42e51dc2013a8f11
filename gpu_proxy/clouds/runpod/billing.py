"""What RunPod billed: ``/v2/billing/pods`` and ``/v2/billing/clusters`` as typed reports, and a spend
summary over both. Billing lags (hourly buckets); the live meter (:mod:`.meter`) reads pods' ``cost``."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from gpu_proxy.errors import ConfigurationError

BUCKET_SIZES = ("hour", "day", "week", "month", "year")


@dataclass(frozen=True)
class BillingRecord:
    """One time bucket of spend for one pod or one cluster (``/v2/billing/pods``, ``/v2/billing/clusters``)."""

    start: str  # RFC 3339, inclusive
    end: str  # exclusive
    resource_id: str  # the pod id or the cluster id
    total_usd: float
    gpu_usd: float
    disk_usd: float
    cpu_usd: float = 0.0  # pods only
    networking_usd: float = 0.0  # clusters only

    @classmethod
    def from_json(cls, data: Mapping[str, Any], id_field: str) -> "BillingRecord":
        return cls(start=data["startTime"], end=data["endTime"], resource_id=data[id_field],
                   total_usd=float(data["totalAmount"]), gpu_usd=float(data.get("gpuAmount") or 0.0),
                   disk_usd=float(data.get("diskAmount") or 0.0), cpu_usd=float(data.get("cpuAmount") or 0.0),
                   networking_usd=float(data.get("networkingAmount") or 0.0))


@dataclass(frozen=True)
class BillingReport:
    """The records of one billing call and RunPod's resolved window (``start``/``end`` snap to buckets)."""

    kind: str  # "pods" or "clusters"
    start: str
    end: str
    bucket_size: str
    records: tuple[BillingRecord, ...]
    total_usd: float  # RunPod's own total over the records

    @classmethod
    def from_json(cls, kind: str, data: Mapping[str, Any]) -> "BillingReport":
        id_field = "podId" if kind == "pods" else "clusterId"
        query = data["metadata"]["query"]
        return cls(kind=kind, start=query["startTime"], end=query["endTime"], bucket_size=query["bucketSize"],
                   records=tuple(BillingRecord.from_json(item, id_field) for item in data["records"]),
                   total_usd=float(data["metadata"]["totals"]["totalAmount"]))

    def by_resource(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for record in self.records:
            result[record.resource_id] = result.get(record.resource_id, 0.0) + record.total_usd
        return result


@dataclass(frozen=True)
class SpendSummary:
    """What RunPod billed over a window: standalone pods and Instant Clusters (whose member pods bill as
    the cluster). RunPod's billing lags (hourly buckets); the live meter reads pods' ``cost`` instead."""

    start: str
    end: str
    pods_usd: float
    clusters_usd: float
    by_resource: Mapping[str, float]  # pod or cluster id -> USD

    @property
    def total_usd(self) -> float:
        return self.pods_usd + self.clusters_usd

    def __str__(self) -> str:
        return (f"${self.total_usd:.2f} from {self.start} to {self.end} (pods ${self.pods_usd:.2f}, "
                f"Instant Clusters ${self.clusters_usd:.2f})")


class BillingQueries:
    """The billing calls of :class:`~gpu_proxy.clouds.runpod.client.RunPodClient` (mixed into it)."""

    def _billing(self, kind: str, id_param: str, resource_id: str | None, start: "datetime | str | None",
                 end: "datetime | str | None", bucket_size: str, last_n: int | None) -> BillingReport:
        if bucket_size not in BUCKET_SIZES:
            raise ConfigurationError(f"bucket_size={bucket_size!r}: use one of {', '.join(BUCKET_SIZES)}.")
        if last_n is not None and (start is not None or end is not None):
            raise ConfigurationError("Give last_n or start/end, not both (RunPod refuses the mix).")
        params: dict[str, Any] = {"bucketSize": bucket_size}
        if start is not None:
            params["startTime"] = rfc3339(start)
        if end is not None:
            params["endTime"] = rfc3339(end)
        if last_n is not None:
            params["lastN"] = int(last_n)
        if resource_id:
            params[id_param] = resource_id
        data = self.call("GET", f"/v2/billing/{kind}", params=params, what=f"read the {kind} billing")
        return BillingReport.from_json(kind, data)
    def pod_billing(self, *, start: "datetime | str | None" = None, end: "datetime | str | None" = None,
                    bucket_size: str = "hour", last_n: int | None = None, pod_id: str | None = None) -> BillingReport:
        """``GET /v2/billing/pods``: spend of standalone pods per pod per bucket (default: the last 30 days)."""
        return self._billing("pods", "podId", pod_id, start, end, bucket_size, last_n)

    def cluster_billing(self, *, start: "datetime | str | None" = None, end: "datetime | str | None" = None,
                        bucket_size: str = "hour", last_n: int | None = None,
                        cluster_id: str | None = None) -> BillingReport:
        """``GET /v2/billing/clusters``: spend of Instant Clusters per cluster per bucket."""
        return self._billing("clusters", "clusterId", cluster_id, start, end, bucket_size, last_n)

    def spend(self, start: "datetime | str", end: "datetime | str | None" = None, *,
              pod_ids: Sequence[str] | None = None, cluster_ids: Sequence[str] | None = None,
              bucket_size: str = "hour") -> SpendSummary:
        """What RunPod billed from ``start`` to ``end`` (default now), snapped out to whole buckets, for the
        given pods and clusters (None: all of them; empty: none of that kind)."""
        reports: dict[str, tuple[BillingReport | None, Sequence[str] | None]] = {}
        for kind, wanted in (("pods", pod_ids), ("clusters", cluster_ids)):
            if wanted is not None and not wanted:
                reports[kind] = (None, wanted)
                continue
            read = self.pod_billing if kind == "pods" else self.cluster_billing
            reports[kind] = (read(start=start, end=end, bucket_size=bucket_size), wanted)
        by_resource: dict[str, float] = {}
        sums = {}
        windows = []
        for kind, (report, wanted) in reports.items():
            amounts = report.by_resource() if report else {}
            if wanted is not None:
                amounts = {key: value for key, value in amounts.items() if key in set(wanted)}
            by_resource.update(amounts)
            sums[kind] = sum(amounts.values())
            if report:
                windows.append((report.start, report.end))
        first, last = (min(w[0] for w in windows), max(w[1] for w in windows)) if windows else \
            (rfc3339(start), rfc3339(end or datetime.now(timezone.utc)))
        return SpendSummary(start=first, end=last, pods_usd=sums["pods"], clusters_usd=sums["clusters"],
                            by_resource=by_resource)


def rfc3339(value: "datetime | str") -> str:
    """A time for RunPod's billing queries: RFC 3339 in UTC (a naive datetime is taken as UTC)."""
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
