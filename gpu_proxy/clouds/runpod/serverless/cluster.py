"""``RunPodServerless``: a RunPod serverless endpoint as a cluster; each run is one serverless job.

The endpoint's workers run ``cluster_image/serverless/handler.py``: each job starts (or reuses) a
single-node Ray cluster inside one worker and runs the same supervisor as every other path, so a
run is limited to one worker's GPUs. Home submits the pickled run as the job's input, follows the
events the handler streams and gets the outcomes at the end (see :mod:`.run`).
"""
from __future__ import annotations

from typing import Any, Mapping

from gpu_proxy.clouds.runpod.serverless import wire
from gpu_proxy.clouds.runpod.auth import APIKey
from gpu_proxy.clouds.runpod.serverless.endpoint_api import EndpointAPI
from gpu_proxy.clouds.runpod.serverless.run import ServerlessRun
from gpu_proxy.clusters.base import Cluster, Endpoint
from gpu_proxy.dataplane.base import DataPlane, InlinePlane
from gpu_proxy.errors import ClusterResourceError, ConfigurationError
from gpu_proxy.runs.control import RunControl
from gpu_proxy.runs.spec import RunSpec


class RunPodServerless(Cluster):
    """Runs on the RunPod serverless endpoint ``endpoint_id``, one job per ``fit``/``validate``/....

    Args:
        endpoint_id: the endpoint's id (console: Serverless; or ``gpu-proxy serverless deploy``).
        api_key: default ``$RUNPOD_API_KEY``, then ``~/.runpod/config.toml``. Never pickled or printed.
        storage_url: an fsspec URL both this machine and the endpoint's workers reach (``s3://bucket/x``).
            Runs over RunPod's 10 MB request limit, and results over ``result_inline_max``, travel
            through it. Without it such runs are refused before anything is sent.
        storage_options: fsspec options for ``storage_url`` here. Only their non-secret part goes to the
            workers, which take credentials from their own environment (set them as RunPod secrets
            on the endpoint).
        base_url: the endpoint API, default ``$RUNPOD_ENDPOINT_BASE_URL`` or ``https://api.runpod.ai/v2``
            (https, or http on loopback for tests).
        gpus_per_worker: the endpoint's GPUs per worker, if known: runs that cannot fit are refused
            here, and ``resources()`` needs no REST call. Default: read from RunPod's REST API.
        rest_base_url: RunPod's REST API for ``resources()`` (default as :class:`RunPodClient`).
        result_inline_max: results larger than this (bytes, JSON) go through ``storage_url``.
        poll_s: pause between stream polls when nothing arrived.
    """

    def __init__(self, endpoint_id: str, *, api_key: str | None = None, storage_url: str | None = None,
                 storage_options: Mapping[str, Any] | None = None, base_url: str | None = None,
                 gpus_per_worker: int | None = None, rest_base_url: str | None = None,
                 result_inline_max: int = wire.DEFAULT_RESULT_INLINE_MAX,
                 max_request_bytes: int = wire.MAX_REQUEST_BYTES, poll_s: float = 0.5) -> None:
        self.endpoint_id = endpoint_id
        self.storage_url = storage_url
        self.storage_options = dict(storage_options or {})
        self.base_url = base_url
        self.gpus_per_worker = gpus_per_worker
        self.rest_base_url = rest_base_url
        self.result_inline_max = result_inline_max
        self.max_request_bytes = max_request_bytes
        self.poll_s = poll_s
        self._api_key = APIKey(api_key) if api_key else None  # shows as <RunPod API key>
        self._api: EndpointAPI | None = EndpointAPI(endpoint_id, api_key, base_url=base_url)  # checks id, key, URL
        self._health: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RunPodServerless({self.endpoint_id!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_api_key"] = None  # a copy loads the key again from the environment where it lands
        state["_api"] = None
        return state

    def _key(self) -> str | None:
        return self._api_key.value if self._api_key else None

    def api(self) -> EndpointAPI:
        if self._api is None:
            self._api = EndpointAPI(self.endpoint_id, self._key(), base_url=self.base_url)
        return self._api

    # ---- Cluster ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Check that the endpoint exists and the key may use it (``/health``)."""
        if self._health is None:
            self._health = self.api().health()

    def health(self) -> dict[str, Any]:
        """RunPod's ``/health``: jobs and workers by state."""
        self._health = self.api().health()
        return self._health

    def endpoint(self) -> Endpoint | None:
        raise ConfigurationError(
            f"RunPodServerless({self.endpoint_id!r}) runs each run as a serverless job: it has no Ray Jobs API, so "
            "detach/attach and the Ray dashboard are not available. Use a RunPodCluster for those.")

    def dashboard_url(self) -> str | None:
        return None

    def resources(self) -> dict[str, float]:
        """One worker's GPUs (a run never spans workers): ``{"GPU": n}``."""
        if self.gpus_per_worker is not None:
            return {"GPU": float(self.gpus_per_worker)}
        from gpu_proxy.clouds.runpod.client import RunPodClient

        client = RunPodClient(self._key(), base_url=self.rest_base_url)
        found = client.call("GET", f"/v2/serverless/{self.endpoint_id}", what=f"read endpoint {self.endpoint_id}")
        self.gpus_per_worker = int((found.get("gpu") or {}).get("count") or 0)
        return {"GPU": float(self.gpus_per_worker)}

    def data_plane(self, spec: RunSpec) -> DataPlane:
        return InlinePlane(spec.name)  # the job input and stream carry the run; storage_url the large parts

    def execute(self, spec: RunSpec, control: RunControl) -> list[dict[str, Any]]:
        self._check_fits(spec)
        run = ServerlessRun.submit(self.api(), spec, self.storage_url, self.storage_options,
                                   max_request_bytes=self.max_request_bytes,
                                   result_inline_max=self.result_inline_max, poll_s=self.poll_s)
        return run.follow(control)

    def _check_fits(self, spec: RunSpec) -> None:
        wanted = spec.resources_per_worker.get("GPU", 0) * spec.num_workers
        if self.gpus_per_worker is not None and wanted > self.gpus_per_worker:
            raise ClusterResourceError(
                f"The run asks for {spec.num_workers} workers x {spec.resources_per_worker.get('GPU', 0):g} GPU = "
                f"{wanted:g} GPUs, but a worker of serverless endpoint {self.endpoint_id} has {self.gpus_per_worker}, "
                "and a serverless run is one worker. Ask for fewer workers, or deploy the endpoint with more GPUs "
                "per worker (`gpu-proxy serverless deploy ... --gpu-count N`).")
