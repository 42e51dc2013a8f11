"""A client of one RunPod serverless endpoint's job API (``https://api.runpod.ai/v2/{endpoint_id}``).

Not the ``runpod`` SDK's ``Endpoint``: that one sleeps a second between stream polls, cannot be given
a key per object without keeping it in a plain attribute, and raises bare ``RuntimeError`` s. This
one is small, uses the same key loading and errors as :class:`~gpu_proxy.clouds.runpod.RunPodClient`,
and never puts the key in a repr, a message or a pickle.

Retries (the shared :mod:`gpu_proxy.http_transport`): reads (status, stream, health) and
cancel are retried on 429, 5xx and network errors. ``/run`` is retried only when RunPod certainly did
not queue the job (429, a refused connection): after a timeout or a 5xx the job may exist, and running
it twice would train twice.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

from gpu_proxy.clouds.runpod.auth import APIKey, load_api_key
from gpu_proxy.clouds.runpod.errors import RunPodAuthError, RunPodError, RunPodNotFoundError, RunPodUnavailableError
from gpu_proxy.clouds.runpod.transport import RetryPolicy, runpod_transport
from gpu_proxy.errors import ConfigurationError

DEFAULT_ENDPOINT_BASE_URL = "https://api.runpod.ai/v2"
ENDPOINT_BASE_URL_ENV = "RUNPOD_ENDPOINT_BASE_URL"  # the same variable the runpod SDK reads
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
_LOOPBACK = ("http://127.0.0.1", "http://localhost", "http://[::1]")


def endpoint_base_url(base_url: str | None = None) -> str:
    url = (base_url or os.environ.get(ENDPOINT_BASE_URL_ENV) or DEFAULT_ENDPOINT_BASE_URL).rstrip("/")
    if not url.startswith(("https://", *_LOOPBACK)):
        raise ConfigurationError(f"endpoint base URL {url!r}: RunPod's endpoint API must be reached over https "
                                 "(the API key travels in a header); plain http only on loopback, for tests.")
    return url


class EndpointAPI:
    """The job API of the serverless endpoint ``endpoint_id``."""

    def __init__(self, endpoint_id: str, api_key: str | None = None, *, base_url: str | None = None,
                 timeout_s: float = 30.0, max_retries: int = 5, backoff_s: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not endpoint_id or "/" in endpoint_id:
            raise ConfigurationError(f"endpoint_id={endpoint_id!r}: give the endpoint's id as the RunPod "
                                     "console shows it (Serverless > your endpoint), e.g. 'abc123xyz'.")
        self.endpoint_id = endpoint_id
        self.base_url = endpoint_base_url(base_url)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        # As before the shared transport: no jitter, Retry-After not read (RunPod's job API sends none).
        policy = RetryPolicy(max_retries=max_retries, backoff_s=backoff_s, max_backoff_s=30.0, jitter=False,
                             respect_retry_after=False, sleep=sleep)
        self._http = runpod_transport(f"{self.base_url}/{endpoint_id}", APIKey(load_api_key(api_key)),
                                      error_for=self._error, timeout_s=timeout_s, policy=policy)

    def __repr__(self) -> str:
        return f"EndpointAPI({self.endpoint_id!r}, base_url={self.base_url!r})"

    def __reduce__(self):
        raise TypeError("an EndpointAPI holds your RunPod API key and cannot be pickled")

    # ---- operations ------------------------------------------------------------------------------
    def run(self, job_input: Mapping[str, Any]) -> str:
        """Queue a job; its id."""
        answer = self._request("POST", "run", body={"input": dict(job_input)}, what="submit a job",
                               retry_unsent_only=True)
        return answer["id"]

    def status(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"status/{job_id}", what=f"read the status of job {job_id}")

    def stream(self, job_id: str) -> dict[str, Any]:
        """The job's outputs since the last call: ``{"status", "stream": [{"output": ...}]}``."""
        return self._request("GET", f"stream/{job_id}", what=f"stream job {job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"cancel/{job_id}", what=f"cancel job {job_id}")

    def health(self) -> dict[str, Any]:
        return self._request("GET", "health", what="check the endpoint's health")

    def purge_queue(self) -> dict[str, Any]:
        return self._request("POST", "purge-queue", what="purge the endpoint's queue")

    # ---- HTTP (the shared transport: gpu_proxy/http_transport.py) ----------------------------------
    def _request(self, method: str, operation: str, *, body: Mapping[str, Any] | None = None, what: str,
                 retry_unsent_only: bool = False) -> Any:
        try:
            answer = self._http.request(method, f"/{operation}", body=body, what=f"{what} on endpoint {self.endpoint_id}",
                                        retry="unsent" if retry_unsent_only else "all")
        except RunPodUnavailableError as error:
            if retry_unsent_only and error.status is None:
                raise RunPodUnavailableError(
                    f"RunPod: {what} on endpoint {self.endpoint_id}: could not reach {self.base_url}. The job may or "
                    "may not have been queued: look at the endpoint's Requests tab before submitting again.") from None
            raise
        return {} if answer is None else answer

    def _error(self, status: int, detail: str, what: str) -> RunPodError:
        if status in (401, 403):
            return RunPodAuthError(
                f"RunPod refused the API key ({status}) while trying to {what} on serverless endpoint "
                f"{self.endpoint_id}. Check RUNPOD_API_KEY (or ~/.runpod/config.toml) and that the key may use "
                "serverless endpoints: https://www.runpod.io/console/user/settings.", status, detail)
        if status == 404:
            return RunPodNotFoundError(
                f"RunPod: no serverless endpoint {self.endpoint_id!r} (or no such job) at {self.base_url} "
                f"(404: {detail}). Check the id in the console (Serverless), or create the endpoint with "
                "`gpu-proxy serverless deploy`.", status, detail)
        if status == 413:
            return RunPodError(f"RunPod: {what}: the request is over the endpoint's size limit (413). Give "
                               "RunPodServerless a storage_url so large runs travel through storage.", status, detail)
        return RunPodError(f"RunPod refused to {what} on endpoint {self.endpoint_id} ({status}: {detail}).",
                           status, detail)
