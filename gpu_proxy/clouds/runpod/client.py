"""A thin typed client of RunPod's REST API v2 (``https://api.runpod.io/v2``).

Why REST v2 and not the ``runpod`` SDK: the SDK's pod functions use the GraphQL API, which RunPod
retires in early 2027 (see DESIGN.md). This client covers only what gpu-proxy needs: pods, Instant
Clusters (``/v2/clusters``), the GPU and data-centre catalog, and spend records (``/v2/billing/pods``,
``/v2/billing/clusters``).

Secrets: the API key lives in one private attribute and travels only in the ``Authorization``
header. It is never part of a repr, a log line, an exception message or a pickle (the client
refuses to be pickled).

Retries: 429 (honouring ``Retry-After``), 5xx and network timeouts are retried with exponential
backoff. Creating a pod or a cluster is not idempotent, so a create that may have reached RunPod
(timeout, 5xx) is followed by a look-up by its unique name before it is retried: a retry never makes a
second pod or cluster.
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import requests

from gpu_proxy.errors import ConfigurationError, GpuProxyError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.runpod.io"
BASE_URL_ENV = "RUNPOD_REST_URL"
API_KEY_ENV = "RUNPOD_API_KEY"
CONFIG_FILE = Path("~/.runpod/config.toml")  # where `runpod config` (the SDK's CLI) keeps the key

# RunPod answers "no capacity" with a 400 and a human-readable detail only (the OpenAPI document of
# createPod says so); these are the phrasings it uses.
_CAPACITY = re.compile(r"no (longer any )?instances? (are )?available|capacity|could not be placed|"
                       r"not enough (free )?gpus|out of stock|no gpus? available", re.IGNORECASE)


# ---- errors ------------------------------------------------------------------------------------------

class RunPodError(GpuProxyError):
    """RunPod's API refused a request or could not be reached. ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class RunPodAuthError(RunPodError):
    """401/403: the API key is missing, wrong, or lacks a permission."""


class RunPodNotFoundError(RunPodError):
    """404: no such pod (or GPU type)."""


class RunPodCapacityError(RunPodError):
    """400 on create: RunPod has no machine with the requested GPUs right now."""


class RunPodRateLimitError(RunPodError):
    """429 after every retry."""


class RunPodUnavailableError(RunPodError):
    """5xx or the network, after every retry."""


# ---- the API key -------------------------------------------------------------------------------------

def load_api_key(api_key: str | None = None, profile: str = "default",
                 config_file: "str | Path | None" = None) -> str:
    """The key given, else ``$RUNPOD_API_KEY``, else ``[profile] api_key`` in ``~/.runpod/config.toml``."""
    if api_key:
        return api_key.strip()
    if os.environ.get(API_KEY_ENV, "").strip():
        return os.environ[API_KEY_ENV].strip()
    path = Path(config_file or CONFIG_FILE).expanduser()
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError:
            # The parser's message may quote the file's content, which holds the key: say where only.
            raise ConfigurationError(f"{path} is not valid TOML: fix it with `runpod config` or set "
                                     f"{API_KEY_ENV}.") from None
        key = data.get(profile, {}).get("api_key") if isinstance(data.get(profile), dict) else None
        if key and str(key).strip():
            return str(key).strip()
    raise ConfigurationError(
        f"No RunPod API key: set {API_KEY_ENV} (create a key at https://www.runpod.io/console/user/settings) "
        f"or run `runpod config` to store it in {CONFIG_FILE}.")


# ---- typed models --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SSHEndpoint:
    host: str
    port: int
    username: str


@dataclass(frozen=True)
class Pod:
    """The parts of a RunPod pod that gpu-proxy reads (``raw`` keeps the whole answer)."""

    id: str
    name: str
    status: str  # PROVISIONING, STARTING, RUNNING, EXITED, ERROR, TERMINATED
    cost_per_hour: float
    gpu_id: str | None
    gpu_count: int
    data_center_id: str | None
    ssh_direct: SSHEndpoint | None  # the published 22/tcp; None until the pod runs
    global_ip: str | None
    internal_dns: str | None
    created_at: str
    started_at: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    cluster_id: str | None = None  # the Instant Cluster this pod belongs to, if any
    cluster_rank: int | None = None  # its NODE_RANK there (0: the primary); None until RunPod assigns it
    cluster_ip: str | None = None  # its address on the cluster's private network

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Pod":
        direct = (data.get("ssh") or {}).get("direct")
        gpu = data.get("gpu") or {}
        networking = data.get("globalNetworking") or {}
        member = data.get("cluster") or {}
        return cls(
            id=data["id"], name=data["name"], status=data["status"], cost_per_hour=float(data.get("cost") or 0.0),
            gpu_id=gpu.get("id"), gpu_count=int(gpu.get("count") or 0), data_center_id=data.get("dataCenterId"),
            ssh_direct=SSHEndpoint(direct["host"], int(direct["port"]), direct["username"]) if direct else None,
            global_ip=networking.get("ip"), internal_dns=networking.get("internalDns"),
            created_at=data.get("createdAt", ""), started_at=data.get("startedAt"), raw=data,
            cluster_id=member.get("id"), cluster_rank=member.get("rank"), cluster_ip=member.get("ip"))


@dataclass(frozen=True)
class GpuType:
    id: str  # what pod creation takes, e.g. "NVIDIA H100 80GB HBM3"
    name: str  # display name, e.g. "H100 SXM"
    memory_gb: int
    secure: bool
    community: bool
    price_secure: float  # USD per GPU-hour
    price_community: float
    max_count_secure: int
    max_count_community: int
    availability: str | None = None  # NONE/LOW/MEDIUM/HIGH when asked for
    data_centers: tuple[tuple[str, str], ...] = ()  # (data centre id, availability) when asked for

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GpuType":
        return cls(id=data["id"], name=data["name"], memory_gb=int(data["memory"]), secure=bool(data["secure"]),
                   community=bool(data["community"]), price_secure=float(data["price"]["secure"]),
                   price_community=float(data["price"]["community"]),
                   max_count_secure=int(data["maxCount"]["secure"]),
                   max_count_community=int(data["maxCount"]["community"]), availability=data.get("availability"),
                   data_centers=tuple((dc["id"], dc["availability"]) for dc in data.get("dataCenters", [])))

    def price(self, cloud: str = "SECURE") -> float:
        return self.price_secure if cloud == "SECURE" else self.price_community

    def max_count(self, cloud: str = "SECURE") -> int:
        return self.max_count_secure if cloud == "SECURE" else self.max_count_community


@dataclass(frozen=True)
class DataCenter:
    id: str
    name: str
    region: str
    global_network: bool
    gpu_availability: tuple[tuple[str, str], ...] = ()  # (GPU type id, availability) when asked for

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DataCenter":
        return cls(id=data["id"], name=data["name"], region=data["region"], global_network=bool(data["globalNetwork"]),
                   gpu_availability=tuple((g["id"], g["availability"]) for g in data.get("gpuAvailability", [])))


@dataclass(frozen=True)
class CreatePodRequest:
    """The body of ``POST /v2/pods`` that gpu-proxy sends (a subset of RunPod's CreatePodRequest)."""

    name: str
    image: str
    gpu_id: str
    gpu_count: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[str, ...] = ("22/tcp",)
    disk_gb: int = 50
    cloud: str = "SECURE"
    data_center_ids: tuple[str, ...] = ()
    global_networking: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "image": self.image,
                                "gpu": {"id": self.gpu_id, "count": self.gpu_count}, "env": dict(self.env),
                                "ports": list(self.ports), "disk": self.disk_gb, "cloud": self.cloud}
        if self.data_center_ids:
            body["dataCenterIds"] = list(self.data_center_ids)
        if self.global_networking:
            body["globalNetworking"] = True
        return body


CLUSTER_TYPE = "TRAINING"  # RunPod's generic multi-node cluster; gpu-proxy starts Ray itself (not type RAY)


@dataclass(frozen=True)
class CreateClusterRequest:
    """The body of ``POST /v2/clusters`` that gpu-proxy sends: ``pod_count`` identical pods of
    ``gpus_per_pod`` x ``gpu_id``, one container configuration for all of them (so one ``env`` for every
    node: each node learns its rank from RunPod's ``NODE_RANK``). Instant Clusters have no cloud choice
    and no private registry (the image must be public)."""

    name: str
    image: str
    gpu_id: str
    gpus_per_pod: int
    pod_count: int
    env: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[str, ...] = ("22/tcp",)
    disk_gb: int = 50
    data_center_ids: tuple[str, ...] = ()
    type: str = CLUSTER_TYPE

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "type": self.type,
                                "compute": {"gpuTypeId": self.gpu_id, "gpuCountPerPod": self.gpus_per_pod,
                                            "podCount": self.pod_count},
                                "image": self.image, "env": dict(self.env), "ports": list(self.ports),
                                "disk": self.disk_gb}
        if self.data_center_ids:
            body["dataCenterIds"] = list(self.data_center_ids)
        return body


@dataclass(frozen=True)
class InstantCluster:
    """A RunPod cluster as ``GET /v2/clusters/{id}`` reports it (member pods: :meth:`RunPodClient.cluster_pods`)."""

    id: str
    name: str
    type: str
    gpu_id: str
    gpus_per_pod: int
    pod_count: int
    data_center_id: str | None
    pods_total: int
    pods_by_status: Mapping[str, int]
    primary_pod_id: str | None  # rank 0, once placed
    primary_status: str | None
    primary_ssh: str | None  # "host:port" of the primary's published 22/tcp, once it runs
    created_at: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "InstantCluster":
        compute, pods, primary = data["compute"], data.get("pods") or {}, data.get("primary") or {}
        return cls(id=data["id"], name=data["name"], type=data["type"], gpu_id=compute["gpuTypeId"],
                   gpus_per_pod=int(compute["gpuCountPerPod"]), pod_count=int(compute["podCount"]),
                   data_center_id=data.get("dataCenterId"), pods_total=int(pods.get("total") or 0),
                   pods_by_status=dict(pods.get("byStatus") or {}), primary_pod_id=primary.get("podId"),
                   primary_status=primary.get("status"), primary_ssh=primary.get("sshEndpoint"),
                   created_at=data.get("createdAt", ""), raw=data)


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


# ---- the client -------------------------------------------------------------------------------------------

class RunPodClient:
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
        self.__key = APIKey(load_api_key(api_key))
        self.base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        if not self.base_url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise ConfigurationError(f"base_url={self.base_url!r}: RunPod's API must be reached over https "
                                     f"(the API key travels in a header).")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._session = requests.Session()

    def __repr__(self) -> str:  # never the key
        return f"RunPodClient(base_url={self.base_url!r})"

    def __reduce__(self):
        raise TypeError("a RunPodClient holds your RunPod API key and cannot be pickled")

    # -- HTTP ----------------------------------------------------------------------------------------------

    def call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
             body: Mapping[str, Any] | None = None, what: str = "") -> Any:
        """Any REST v2 call (``client.call("GET", "/v2/serverless")``), with this client's key,
        retries and errors; returns the decoded JSON. For endpoints without a typed method here."""
        return self._request(method, path, params=params, body=body, what=what)

    def _request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                 body: Mapping[str, Any] | None = None, what: str = "",
                 before_retry: Callable[[], Any] | None = None) -> Any:
        """One API call with retries; returns the decoded JSON (None for 204).

        ``before_retry`` runs before retrying a call that may have reached RunPod; a non-None result
        is returned instead of retrying (how pod creation stays idempotent).
        """
        what = what or f"{method} {path}"
        url = self.base_url + path
        headers = {"Authorization": f"Bearer {self.__key.value}", "Accept": "application/json"}
        attempt = 0
        while True:
            try:
                response = self._session.request(method, url, params=params, json=body, headers=headers,
                                                 timeout=self.timeout_s)
            except requests.Timeout:
                problem, status, wait = f"no answer within {self.timeout_s:.0f} s", None, None
            except requests.ConnectionError as error:
                problem, status, wait = f"could not reach {self.base_url} ({type(error).__name__})", None, None
            else:
                log.debug("RunPod %s %s -> %d", method, path, response.status_code)
                if response.status_code < 400:
                    if response.status_code == 204 or not response.content:
                        return None
                    return response.json()
                status = response.status_code
                detail = _detail(response)
                if status == 429:
                    problem, wait = f"rate limited ({detail})", _retry_after(response)
                elif status >= 500:
                    problem, wait = f"RunPod answered {status} ({detail})", None
                else:
                    raise self._error(status, detail, what)
            if attempt >= self.max_retries:
                kind = RunPodRateLimitError if status == 429 else RunPodUnavailableError
                raise kind(f"RunPod: {what} failed after {attempt + 1} attempts: {problem}. Try again later; "
                           f"https://status.runpod.io shows outages.", status)
            delay = min(self.max_backoff_s, wait if wait is not None
                        else self.backoff_s * 2 ** attempt * (0.5 + random.random() / 2))
            log.info("RunPod: %s: %s; retrying in %.1f s", what, problem, delay)
            self._sleep(delay)
            attempt += 1
            # A 429 was not acted on; after anything else the first attempt may have been.
            if before_retry is not None and status != 429:
                found = before_retry()
                if found is not None:
                    return found

    def _error(self, status: int, detail: str, what: str) -> RunPodError:
        if status == 401:
            return RunPodAuthError(
                f"RunPod refused the API key (401: {detail}) while trying to {what}. Check RUNPOD_API_KEY (or "
                f"~/.runpod/config.toml): create a key at https://www.runpod.io/console/user/settings.",
                status, detail)
        if status == 403:
            return RunPodAuthError(
                f"RunPod: the API key may not {what} (403: {detail}). Give the key read/write access to pods "
                f"in the RunPod console (API keys), or use another key.", status, detail)
        if status == 402:
            return RunPodError(f"RunPod: {what}: insufficient balance (402: {detail}). Add funds in the console.",
                               status, detail)
        if status == 409 and "cluster" in detail.lower():
            return RunPodError(f"RunPod refused to {what} (409: {detail}): the pod belongs to an Instant Cluster; "
                               f"delete the cluster instead (DELETE /v2/clusters/{{id}}, or `gpu-proxy down`).",
                               status, detail)
        if status == 404:
            return RunPodNotFoundError(f"RunPod: {what}: not found (404: {detail}).", status, detail)
        if status == 400 and _CAPACITY.search(detail):
            return RunPodCapacityError(f"RunPod has no capacity: {detail}", status, detail)
        return RunPodError(f"RunPod refused to {what} ({status}: {detail}).", status, detail)

    # -- pods ----------------------------------------------------------------------------------------------

    def list_pods(self, *, include_cluster_pods: bool = False) -> list[Pod]:
        """Standalone pods; with ``include_cluster_pods`` also Instant Cluster members (RunPod hides them)."""
        params = {"includeClusterPods": "true"} if include_cluster_pods else None
        data = self._request("GET", "/v2/pods", params=params, what="list pods")
        return [Pod.from_json(item) for item in data["pods"]]

    def get_pod(self, pod_id: str) -> Pod:
        return Pod.from_json(self._request("GET", f"/v2/pods/{_id(pod_id)}", what=f"read pod {pod_id}"))

    def find_pod(self, name: str) -> Pod | None:
        """The pod named ``name``, if one exists (gpu-proxy's pod names are unique)."""
        return next((pod for pod in self.list_pods() if pod.name == name), None)

    def create_pod(self, request: CreatePodRequest) -> Pod:
        """Create a pod; a retry after a create that may have reached RunPod adopts the pod it made.

        Raises :class:`RunPodCapacityError` whose message says where the GPUs are available now.
        """
        try:
            data = self._request("POST", "/v2/pods", body=request.to_json(),
                                 what=f"create pod {request.name} ({request.gpu_count} x {request.gpu_id})",
                                 before_retry=lambda: self.find_pod(request.name))
        except RunPodCapacityError as error:
            raise RunPodCapacityError(f"{error}\n{self.where_available(request.gpu_id, request.gpu_count, request.cloud)}",
                                      error.status, error.detail) from None
        return data if isinstance(data, Pod) else Pod.from_json(data)

    def stop_pod(self, pod_id: str) -> Pod:
        return Pod.from_json(self._request("POST", f"/v2/pods/{_id(pod_id)}/action", body={"action": "stop"},
                                           what=f"stop pod {pod_id}"))

    def terminate_pod(self, pod_id: str) -> None:
        """Delete the pod for good. A pod already gone counts as terminated."""
        try:
            self._request("DELETE", f"/v2/pods/{_id(pod_id)}", what=f"terminate pod {pod_id}")
        except RunPodNotFoundError:
            pass

    # -- Instant Clusters --------------------------------------------------------------------------------

    def list_clusters(self) -> list[InstantCluster]:
        data = self._request("GET", "/v2/clusters", what="list clusters")
        return [InstantCluster.from_json(item) for item in data["clusters"]]

    def get_cluster(self, cluster_id: str) -> InstantCluster:
        return InstantCluster.from_json(self._request("GET", f"/v2/clusters/{_id(cluster_id, 'cluster')}",
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
            data = self._request("POST", "/v2/clusters", body=request.to_json(), what=what,
                                 before_retry=lambda: self.find_cluster(request.name))
        except RunPodCapacityError as error:
            where = self.where_available(request.gpu_id, request.gpus_per_pod, "SECURE", product="CLUSTER")
            raise RunPodCapacityError(f"{error}\n{where}", error.status, error.detail) from None
        return data if isinstance(data, InstantCluster) else InstantCluster.from_json(data)

    def cluster_pods(self, cluster_id: str) -> list[Pod]:
        """The cluster's member pods, in rank order (rank 0, the primary, first; unranked ones last)."""
        data = self._request("GET", f"/v2/clusters/{_id(cluster_id, 'cluster')}/pods",
                             what=f"read the pods of cluster {cluster_id}")
        pods = [Pod.from_json(item) for item in data["pods"]]
        return sorted(pods, key=lambda pod: (pod.cluster_rank is None, pod.cluster_rank or 0, pod.id))

    def delete_cluster(self, cluster_id: str) -> None:
        """Delete the cluster and terminate all its pods. A cluster already gone counts as deleted."""
        try:
            self._request("DELETE", f"/v2/clusters/{_id(cluster_id, 'cluster')}",
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
        data = self._request("GET", "/v2/catalog/gpus", params=params, what="read the GPU catalog")
        return [GpuType.from_json(item) for item in data["gpus"]]

    def data_centers(self, *, gpu_availability: bool = False, global_network: bool | None = None) -> list[DataCenter]:
        params: dict[str, Any] = {}
        if gpu_availability:
            params["include"] = "GPU_AVAILABILITY"
        if global_network is not None:
            params["globalNetwork"] = "true" if global_network else "false"
        data = self._request("GET", "/v2/catalog/datacenters", params=params, what="read the data centres")
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


    # -- billing ---------------------------------------------------------------------------------------------

    def _billing(self, kind: str, id_param: str, resource_id: str | None, start: "datetime | str | None",
                 end: "datetime | str | None", bucket_size: str, last_n: int | None) -> BillingReport:
        if bucket_size not in BUCKET_SIZES:
            raise ConfigurationError(f"bucket_size={bucket_size!r}: use one of {', '.join(BUCKET_SIZES)}.")
        if last_n is not None and (start is not None or end is not None):
            raise ConfigurationError("Give last_n or start/end, not both (RunPod refuses the mix).")
        params: dict[str, Any] = {"bucketSize": bucket_size}
        if start is not None:
            params["startTime"] = _rfc3339(start)
        if end is not None:
            params["endTime"] = _rfc3339(end)
        if last_n is not None:
            params["lastN"] = int(last_n)
        if resource_id:
            params[id_param] = resource_id
        data = self._request("GET", f"/v2/billing/{kind}", params=params, what=f"read the {kind} billing")
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
            (_rfc3339(start), _rfc3339(end or datetime.now(timezone.utc)))
        return SpendSummary(start=first, end=last, pods_usd=sums["pods"], clusters_usd=sums["clusters"],
                            by_resource=by_resource)


class APIKey:
    """Holds the key so that printing an object's attributes (a debugger, vars()) shows no secret."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<RunPod API key>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("the RunPod API key cannot be pickled")


def _id(resource_id: str, kind: str = "pod") -> str:
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", resource_id or ""):
        raise ConfigurationError(f"{resource_id!r} is not a RunPod {kind} id.")
    return resource_id


def _rfc3339(value: "datetime | str") -> str:
    """A time for RunPod's billing queries: RFC 3339 in UTC (a naive datetime is taken as UTC)."""
    if isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _detail(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.reason or f"HTTP {response.status_code}"
    if isinstance(data, dict):
        detail = str(data.get("detail") or data.get("title") or data.get("error") or "")
        if data.get("errors"):
            detail += ": " + "; ".join(map(str, data["errors"]))
        return detail or response.reason
    return response.reason


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
