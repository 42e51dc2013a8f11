"""What RunPod's APIs answer when they refuse, as exceptions that say what to do next."""
from __future__ import annotations

import re

from gpu_proxy.errors import GpuProxyError

# RunPod answers "no capacity" with a 400 and a human-readable detail only (the OpenAPI document of
# createPod says so); these are the phrasings it uses.
_CAPACITY = re.compile(r"no (longer any )?instances? (are )?available|capacity|could not be placed|"
                       r"not enough (free )?gpus|out of stock|no gpus? available", re.IGNORECASE)


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


def rest_error(status: int, detail: str, what: str) -> RunPodError:
    """The exception for a refusal of the REST v2 API (``api.runpod.io/v2``) while trying to ``what``."""
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
