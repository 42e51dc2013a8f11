"""A thin typed client of RunPod's REST API v2 (``https://api.runpod.io/v2``).

Why REST v2 and not the ``runpod`` SDK: the SDK's pod functions use the GraphQL API, which RunPod
retires in early 2027 (see DESIGN.md). This client covers only what gpu-proxy needs: pods and the GPU
and data-centre catalog.

Secrets: the API key lives in one private attribute and travels only in the ``Authorization``
header. It is never part of a repr, a log line, an exception message or a pickle (the client
refuses to be pickled).

Retries: 429 (honouring ``Retry-After``), 5xx and network timeouts are retried with exponential
backoff. Creating a pod is not idempotent, so a create that may have reached RunPod (timeout, 5xx)
is followed by a look-up of the pod by its unique name before it is retried: a retry never makes a
second pod.
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

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

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Pod":
        direct = (data.get("ssh") or {}).get("direct")
        gpu = data.get("gpu") or {}
        networking = data.get("globalNetworking") or {}
        return cls(
            id=data["id"], name=data["name"], status=data["status"], cost_per_hour=float(data.get("cost") or 0.0),
            gpu_id=gpu.get("id"), gpu_count=int(gpu.get("count") or 0), data_center_id=data.get("dataCenterId"),
            ssh_direct=SSHEndpoint(direct["host"], int(direct["port"]), direct["username"]) if direct else None,
            global_ip=networking.get("ip"), internal_dns=networking.get("internalDns"),
            created_at=data.get("createdAt", ""), started_at=data.get("startedAt"), raw=data)


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
        if status == 404:
            return RunPodNotFoundError(f"RunPod: {what}: not found (404: {detail}).", status, detail)
        if status == 400 and _CAPACITY.search(detail):
            return RunPodCapacityError(f"RunPod has no capacity: {detail}", status, detail)
        return RunPodError(f"RunPod refused to {what} ({status}: {detail}).", status, detail)

    # -- pods ----------------------------------------------------------------------------------------------

    def list_pods(self) -> list[Pod]:
        data = self._request("GET", "/v2/pods", what="list pods")
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

    # -- catalog and billing ---------------------------------------------------------------------------

    def gpu_types(self, *, availability: bool = False, count: int = 1, cloud: str | None = None) -> list[GpuType]:
        params: dict[str, Any] = {}
        if availability:
            params.update(include="AVAILABILITY", product="POD", count=count)
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

    def where_available(self, gpu_id: str, count: int = 1, cloud: str = "SECURE") -> str:
        """A sentence saying where ``count`` x ``gpu_id`` (or other GPU types) can be had now."""
        try:
            gpus = self.gpu_types(availability=True, count=count, cloud=cloud)
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


def _id(pod_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", pod_id or ""):
        raise ConfigurationError(f"{pod_id!r} is not a RunPod pod id.")
    return pod_id


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
