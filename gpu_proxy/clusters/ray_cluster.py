"""An existing Ray cluster, reached through its dashboard address; runs are Ray Jobs on it."""
from __future__ import annotations

from typing import Any, Callable

from gpu_proxy.clusters.base import Endpoint, JobsCluster
from gpu_proxy.clusters.dashboard import DashboardClient, HTTPCallError
from gpu_proxy.clusters.ray_token import find_ray_token
from gpu_proxy.errors import ConfigurationError, GpuProxyError


class ClusterUnreachableError(GpuProxyError):
    """The cluster's dashboard did not answer, or refused our token."""


class RayCluster(JobsCluster):
    """Any Ray cluster by its dashboard address: ``ray up`` on AWS/GCP/Azure, KubeRay, ``ray start``.

    Args:
        address: the dashboard URL, e.g. ``"http://127.0.0.1:8265"`` (through an SSH tunnel when the
            cluster is remote: never expose a Ray port to the internet).
        token: the cluster's Ray auth token; default: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
            ``~/.ray/auth_token``, where Ray itself looks.
    """

    def __init__(self, address: str, token: str | None = None, timeout_s: float = 10.0) -> None:
        if address.startswith("ray://"):
            from gpu_proxy.clusters.resolve import resolve_cluster

            resolve_cluster(address)  # raises the explanation
        if not address.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"address={address!r}: give the Ray dashboard's URL, e.g. 'http://127.0.0.1:8265'.")
        self.address = address.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self._checked = False

    def __repr__(self) -> str:  # the token stays out of reprs and logs
        return f"RayCluster({self.address!r})"

    def endpoint(self) -> Endpoint:
        return Endpoint(self.address, self._token or find_ray_token())

    def _dashboard(self, call: Callable[[DashboardClient], Any], path: str) -> Any:
        """``call`` on the dashboard, its failures said in the user's terms."""
        try:
            return call(DashboardClient(self.endpoint(), self.timeout_s))
        except HTTPCallError as exc:
            if exc.status in (401, 403):
                raise ClusterUnreachableError(
                    f"The Ray cluster at {self.address} {'needs' if exc.status == 401 else 'rejected'} an auth "
                    "token. Pass RayCluster(address, token=...) or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH "
                    "to the cluster's token (`ray get-auth-token` on the head node prints it).") from None
            if exc.status is not None:
                raise ClusterUnreachableError(
                    f"The Ray dashboard at {self.address} answered {exc.status} to {path}.") from None
            raise ClusterUnreachableError(
                f"No Ray dashboard answers at {self.address} ({exc.problem}). Is the cluster up, and is the "
                "address the dashboard's (port 8265 by default), through your SSH tunnel if remote?") from None

    def start(self) -> None:
        if not self._checked:
            self._dashboard(lambda client: client.get_json("/api/version"), "/api/version")
            self._checked = True

    def resources(self) -> dict[str, float]:
        return self._dashboard(DashboardClient.resources, "/api/v0/nodes")
