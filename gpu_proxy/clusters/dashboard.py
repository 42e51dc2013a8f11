"""The one client of a Ray dashboard's HTTP API: its JSON routes, its package store, its Jobs SDK.

Every call carries the cluster's token (``Endpoint.headers``). Errors are ``urllib``'s own
(``HTTPError`` with its code, ``URLError`` when nothing answers); callers say what they mean.
"""
from __future__ import annotations

import json
import urllib.request
from typing import TYPE_CHECKING, Any

from gpu_proxy.clusters.base import Endpoint

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient


class DashboardClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s

    def _request(self, path: str, data: bytes | None = None, method: str = "GET",
                 timeout_s: float | None = None) -> bytes:
        request = urllib.request.Request(self.endpoint.dashboard_url.rstrip("/") + path, data=data, method=method,
                                         headers=self.endpoint.headers())
        with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
            return response.read()

    def get_json(self, path: str) -> Any:
        return json.loads(self._request(path))

    def put_package(self, name: str, data: bytes, timeout_s: float | None = None) -> None:
        """Store ``data`` in the cluster's GCS under the runtime-env package ``name`` (token-checked)."""
        self._request(f"/api/packages/gcs/{name}", data=data, method="PUT", timeout_s=timeout_s)

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

    def jobs(self) -> "JobSubmissionClient":
        from ray.job_submission import JobSubmissionClient  # the Jobs SDK, only where runs are submitted

        return JobSubmissionClient(self.endpoint.dashboard_url, headers=self.endpoint.headers())
