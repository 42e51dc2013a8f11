"""The one client of a Ray dashboard's HTTP API: its JSON routes, its package store, its Jobs SDK.

Every call carries the cluster's token (``Endpoint.headers``) and goes through the one HTTP transport
(:mod:`gpu_proxy.http_transport`). What is retried: a 502/503/504 (the dashboard, or a proxy in front
of it, busy for a moment), twice, within a second. Not retried: a refused connection or a timeout,
since a wrong address or a cluster that is down must be said at once; callers that wait for a
dashboard poll it themselves. Errors are :class:`~gpu_proxy.http_transport.HTTPCallError` (an
``OSError``) with ``status`` (None when nothing answered); callers say what they mean.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.http_transport import HTTPCallError, HTTPTransport, RetryPolicy

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

__all__ = ["DASHBOARD_RETRIES", "DashboardClient", "HTTPCallError"]

DASHBOARD_RETRIES = RetryPolicy(max_retries=2, backoff_s=0.25, max_backoff_s=1.0, statuses=frozenset({502, 503, 504}),
                                connect_errors=False, read_errors=False)


class DashboardClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float = 10.0, policy: RetryPolicy = DASHBOARD_RETRIES) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._http = HTTPTransport(endpoint.dashboard_url, service=f"the Ray dashboard at {endpoint.dashboard_url}",
                                   headers=endpoint.headers, timeout_s=timeout_s, policy=policy,
                                   hint="Is the cluster up, and the address its dashboard's (through your SSH "
                                        "tunnel if remote)?")

    def __repr__(self) -> str:  # never the token
        return f"DashboardClient({self.endpoint.dashboard_url!r})"

    def get_json(self, path: str) -> Any:
        """The decoded answer of ``GET path`` (raises ValueError when it is not JSON)."""
        return self._http.request("GET", path, what=f"read {path.split('?')[0]}")

    def put_package(self, name: str, data: bytes, timeout_s: float | None = None) -> None:
        """Store ``data`` in the cluster's GCS under the runtime-env package ``name`` (token-checked)."""
        self._http.request("PUT", f"/api/packages/gcs/{name}", data=data, what=f"store package {name}",
                           timeout_s=timeout_s)

    def alive_nodes(self) -> list[dict]:
        nodes = self.get_json("/api/v0/nodes?detail=1")["data"]["result"]["result"]
        return [node for node in nodes if node.get("state") == "ALIVE"]

    def resources(self) -> dict[str, float]:
        """Total resources of the alive nodes, e.g. ``{"CPU": 16.0, "GPU": 8.0}``."""
        totals: dict[str, float] = {}
        for node in self.alive_nodes():
            for key, value in node.get("resources_total", {}).items():
                if not key.startswith("node:"):
                    totals[key] = totals.get(key, 0.0) + value
        return totals

    def list_jobs(self) -> list[dict]:
        """Every Ray Job the cluster knows (``GET /api/jobs/``), as the Jobs API lists them."""
        return self.get_json("/api/jobs/")

    def jobs(self) -> "JobSubmissionClient":
        from ray.job_submission import JobSubmissionClient  # the Jobs SDK, only where runs are submitted

        return JobSubmissionClient(self.endpoint.dashboard_url, headers=self.endpoint.headers())
