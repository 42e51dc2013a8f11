"""A thin typed client of RunPod's REST API v2 (``https://api.runpod.io/v2``): :class:`RunPodClient`.

Why REST v2 and not the ``runpod`` SDK: the SDK's pod functions use the GraphQL API, which RunPod
retires in early 2027 (docs/decisions/runpod.md). This client covers only what gpu-proxy needs: pods, Instant
Clusters (``/v2/clusters``), the GPU, data-centre and template catalog, and spend records
(:mod:`.billing`). HTTP, retries and the "find by name before creating again" rule live in
:mod:`gpu_proxy.http_transport` (RunPod's key and errors on it: :mod:`.transport`); errors in
:mod:`.errors`; the key in :mod:`.auth`; the models in :mod:`.models`.

Secrets: the API key lives in one private attribute and travels only in the ``Authorization``
header. It is never part of a repr, a log line, an exception message or a pickle (the client
refuses to be pickled).
"""
from __future__ import annotations

import os
import re
import time
from typing import Any, Callable, Mapping

from gpu_proxy.clouds.runpod.auth import API_KEY_ENV, CONFIG_FILE, APIKey, load_api_key
from gpu_proxy.clouds.runpod.billing import (BUCKET_SIZES, BillingQueries, BillingRecord, BillingReport,
                                             SpendSummary)
from gpu_proxy.clouds.runpod.errors import (RunPodAuthError, RunPodCapacityError, RunPodError, RunPodNotFoundError,
                                            RunPodRateLimitError, RunPodUnavailableError, rest_error)
from gpu_proxy.clouds.runpod.models import (CLUSTER_TYPE, CreateClusterRequest, CreatePodRequest, DataCenter, GpuType,
                                            InstantCluster, Pod, SSHEndpoint, Template)
from gpu_proxy.clouds.runpod.transport import RetryMode, RetryPolicy, runpod_transport
from gpu_proxy.errors import ConfigurationError

# Re-exported: these names were importable from this module before it was split.
__all__ = ["API_KEY_ENV", "APIKey", "BASE_URL_ENV", "BUCKET_SIZES", "BillingRecord", "BillingReport", "CLUSTER_TYPE",
           "CONFIG_FILE", "CreateClusterRequest", "CreatePodRequest", "DEFAULT_BASE_URL", "DataCenter", "GpuType",
           "InstantCluster", "Pod", "RunPodAuthError", "RunPodCapacityError", "RunPodClient", "RunPodError",
           "RunPodNotFoundError", "RunPodRateLimitError", "RunPodUnavailableError", "SSHEndpoint", "SpendSummary",
           "Template", "load_api_key", "rest_base_url"]

DEFAULT_BASE_URL = "https://api.runpod.io"
BASE_URL_ENV = "RUNPOD_REST_URL"


def rest_base_url(base_url: str | None = None) -> str:
    """``base_url``, else ``$RUNPOD_REST_URL``, else RunPod's; https only (plain http on loopback, for tests)."""
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    if not url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
        raise ConfigurationError(f"base_url={url!r}: RunPod's API must be reached over https "
                                 f"(the API key travels in a header).")
    return url


class RunPodClient(BillingQueries):
    """RunPod REST v2.

    Args:
        api_key: default ``$RUNPOD_API_KEY``, then ``~/.runpod/config.toml`` (see :func:`load_api_key`).
        base_url: default ``$RUNPOD_REST_URL``, then ``https://api.runpod.io`` (tests point it at a fake).
        timeout_s: per HTTP request.
        max_retries: retries of one call on 429, 5xx and network errors before giving up.
        backoff_s, max_backoff_s: exponential backoff between retries (with jitter); a ``Retry-After``
            from RunPod wins, capped at ``max_backoff_s``.
    """

    def __init__(self, api_key: str | None = None, *, base_url: str | None = None, timeout_s: float = 30.0,
                 max_retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = rest_base_url(base_url)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        policy = RetryPolicy(max_retries=max_retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s, sleep=sleep)
        self._http = runpod_transport(self.base_url, APIKey(load_api_key(api_key)), error_for=rest_error,
                                      timeout_s=timeout_s, policy=policy)

    def __repr__(self) -> str:  # never the key
        return f"RunPodClient(base_url={self.base_url!r})"

    def __reduce__(self):
        raise TypeError("a RunPodClient holds your RunPod API key and cannot be pickled")

    def call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
             body: Mapping[str, Any] | None = None, what: str = "", retry: RetryMode | None = None) -> Any:
        """Any REST v2 call (``client.call("GET", "/v2/serverless")``), with this client's key, retries
        (see :mod:`gpu_proxy.http_transport`: a POST is repeated only when RunPod certainly did not act on it) and
        errors; returns the decoded JSON. For endpoints without a typed method here."""
        return self._http.request(method, path, params=params, body=body, what=what, retry=retry)

    # -- pods ----------------------------------------------------------------------------------------------

    def list_pods(self, *, include_cluster_pods: bool = False) -> list[Pod]:
        """Standalone pods; with ``include_cluster_pods`` also Instant Cluster members (RunPod hides them)."""
        params = {"includeClusterPods": "true"} if include_cluster_pods else None
        data = self._http.request("GET", "/v2/pods", params=params, what="list pods")
        return [Pod.from_json(item) for item in data["pods"]]

    def get_pod(self, pod_id: str) -> Pod:
        return Pod.from_json(self._http.request("GET", f"/v2/pods/{_id(pod_id)}", what=f"read pod {pod_id}"))

    def find_pod(self, name: str) -> Pod | None:
        """The pod named ``name``, if one exists (gpu-proxy's pod names are unique)."""
        return next((pod for pod in self.list_pods() if pod.name == name), None)

    def create_pod(self, request: CreatePodRequest) -> Pod:
        """Create a pod; a retry after a create that may have reached RunPod adopts the pod it made.

        Raises :class:`RunPodCapacityError` whose message says where the GPUs are available now.
        """
        try:
            data = self._http.create("/v2/pods", request.to_json(),
                                     what=f"create pod {request.name} ({request.gpu_count} x {request.gpu_id})",
                                     find=lambda: self.find_pod(request.name))
        except RunPodCapacityError as error:
            raise RunPodCapacityError(f"{error}\n{self.where_available(request.gpu_id, request.gpu_count, request.cloud)}",
                                      error.status, error.detail) from None
        return data if isinstance(data, Pod) else Pod.from_json(data)

    def stop_pod(self, pod_id: str) -> Pod:
        return Pod.from_json(self._http.request("POST", f"/v2/pods/{_id(pod_id)}/action", body={"action": "stop"},
                                                what=f"stop pod {pod_id}", retry="all"))

    def terminate_pod(self, pod_id: str) -> None:
        """Delete the pod for good. A pod already gone counts as terminated."""
        try:
            self._http.request("DELETE", f"/v2/pods/{_id(pod_id)}", what=f"terminate pod {pod_id}")
        except RunPodNotFoundError:
            pass

    # -- Instant Clusters --------------------------------------------------------------------------------

    def list_clusters(self) -> list[InstantCluster]:
        data = self._http.request("GET", "/v2/clusters", what="list clusters")
        return [InstantCluster.from_json(item) for item in data["clusters"]]

    def get_cluster(self, cluster_id: str) -> InstantCluster:
        return InstantCluster.from_json(self._http.request("GET", f"/v2/clusters/{_id(cluster_id, 'cluster')}",
                                                      what=f"read cluster {cluster_id}"))

    def find_cluster(self, name: str) -> InstantCluster | None:
        """The cluster named ``name``, if one exists (gpu-proxy's cluster names are unique)."""
        return next((cluster for cluster in self.list_clusters() if cluster.name == name), None)

    def create_cluster(self, request: CreateClusterRequest) -> InstantCluster:
        """Create an Instant Cluster (all its pods at once); a retry after a create that may have reached
        RunPod (timeout, 5xx) adopts the cluster it made, found by its unique name: never two clusters.

        Raises :class:`RunPodCapacityError` whose message says where the GPUs are available now.
        """
        what = (f"create Instant Cluster {request.name} ({request.pod_count} pods x {request.gpus_per_pod} x "
                f"{request.gpu_id})")
        try:
            data = self._http.create("/v2/clusters", request.to_json(), what=what,
                                     find=lambda: self.find_cluster(request.name))
        except RunPodCapacityError as error:
            where = self.where_available(request.gpu_id, request.gpus_per_pod, "SECURE", product="CLUSTER")
            raise RunPodCapacityError(f"{error}\n{where}", error.status, error.detail) from None
        return data if isinstance(data, InstantCluster) else InstantCluster.from_json(data)

    def cluster_pods(self, cluster_id: str) -> list[Pod]:
        """The cluster's member pods, in rank order (rank 0, the primary, first; unranked ones last)."""
        data = self._http.request("GET", f"/v2/clusters/{_id(cluster_id, 'cluster')}/pods",
                             what=f"read the pods of cluster {cluster_id}")
        pods = [Pod.from_json(item) for item in data["pods"]]
        return sorted(pods, key=lambda pod: (pod.cluster_rank is None, pod.cluster_rank or 0, pod.id))

    def delete_cluster(self, cluster_id: str) -> None:
        """Delete the cluster and terminate all its pods. A cluster already gone counts as deleted."""
        try:
            self._http.request("DELETE", f"/v2/clusters/{_id(cluster_id, 'cluster')}",
                          what=f"delete cluster {cluster_id}")
        except RunPodNotFoundError:
            pass

    # -- catalog and billing ---------------------------------------------------------------------------

    def gpu_types(self, *, availability: bool = False, count: int = 1, cloud: str | None = None,
                  product: str = "POD") -> list[GpuType]:
        params: dict[str, Any] = {}
        if availability:
            params.update(include="AVAILABILITY", product=product, count=count)
            if cloud:
                params["cloud"] = cloud
        data = self._http.request("GET", "/v2/catalog/gpus", params=params, what="read the GPU catalog")
        return [GpuType.from_json(item) for item in data["gpus"]]

    def data_centers(self, *, gpu_availability: bool = False, global_network: bool | None = None) -> list[DataCenter]:
        params: dict[str, Any] = {}
        if gpu_availability:
            params["include"] = "GPU_AVAILABILITY"
        if global_network is not None:
            params["globalNetwork"] = "true" if global_network else "false"
        data = self._http.request("GET", "/v2/catalog/datacenters", params=params, what="read the data centres")
        return [DataCenter.from_json(item) for item in data["dataCenters"]]

    def where_available(self, gpu_id: str, count: int = 1, cloud: str = "SECURE", product: str = "POD") -> str:
        """A sentence saying where ``count`` x ``gpu_id`` (or other GPU types) can be had now."""
        try:
            gpus = self.gpu_types(availability=True, count=count, cloud=cloud, product=product)
        except RunPodError as error:
            return f"(Could not read RunPod's availability to suggest alternatives: {error})"
        wanted = next((gpu for gpu in gpus if gpu.id == gpu_id), None)
        places = [f"{dc} ({level})" for dc, level in (wanted.data_centers if wanted else ()) if level != "NONE"]
        if places:
            return (f"{count} x {gpu_id} is available now in: {', '.join(places)}; pass data_centers=[...] with one "
                    f"of them, or leave data_centers empty to let RunPod choose.")
        others = [f"{gpu.id} ({gpu.availability}, ${gpu.price(cloud):.2f}/GPU-h)" for gpu in gpus
                  if gpu.id != gpu_id and gpu.availability not in (None, "NONE")]
        return (f"{count} x {gpu_id} is not available in any data centre right now ({cloud.lower()} cloud). "
                + (f"GPU types with {count} available now: {', '.join(others)}." if others
                   else "No GPU type has that many available: try fewer GPUs per node, or later."))

    def templates(self, source: str = "official") -> list[Template]:
        """RunPod's public template catalog (``GET /v2/catalog/templates``): its stock images."""
        data = self._http.request("GET", "/v2/catalog/templates", params={"source": source},
                                  what="read the template catalog")
        return [Template.from_json(item) for item in data["templates"]]


def _id(resource_id: str, kind: str = "pod") -> str:
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", resource_id or ""):
        raise ConfigurationError(f"{resource_id!r} is not a RunPod {kind} id.")
    return resource_id
