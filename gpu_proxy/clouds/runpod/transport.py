"""RunPod's side of the one HTTP transport (:mod:`gpu_proxy.http_transport`): the API key in the
``Authorization`` header, RunPod's exceptions (:mod:`.errors`), and what to do when RunPod stays down.

Retries, backoff and the "find by name before creating again" rule are the shared transport's; the
REST client (:class:`~gpu_proxy.clouds.runpod.client.RunPodClient`) and the serverless job API
(:class:`~gpu_proxy.clouds.runpod.serverless.endpoint_api.EndpointAPI`) each build one here.
"""
from __future__ import annotations

from gpu_proxy.clouds.runpod.auth import APIKey
from gpu_proxy.clouds.runpod.errors import RunPodError, RunPodRateLimitError, RunPodUnavailableError
from gpu_proxy.http_transport import ErrorFor, HTTPTransport, RetryMode, RetryPolicy

__all__ = ["RetryMode", "RetryPolicy", "runpod_transport"]

STATUS_HINT = "Try again later; https://status.runpod.io shows outages."


def runpod_transport(base_url: str, key: APIKey, *, error_for: ErrorFor, service: str = "RunPod",
                     timeout_s: float = 30.0, policy: RetryPolicy = RetryPolicy()) -> HTTPTransport:
    """A transport to ``base_url`` sending ``key``; refusals become ``error_for``'s exceptions, spent
    retries :class:`RunPodRateLimitError` (429) or :class:`RunPodUnavailableError` (5xx, the network)."""
    return HTTPTransport(base_url, service=service, headers=lambda: {"Authorization": f"Bearer {key.value}"},
                         timeout_s=timeout_s, policy=policy, error_for=error_for, gave_up_for=_gave_up,
                         hint=STATUS_HINT)


def _gave_up(status: int | None, message: str) -> RunPodError:
    kind = RunPodRateLimitError if status == 429 else RunPodUnavailableError
    return kind(message, status)
