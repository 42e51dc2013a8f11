"""Errors the core raises. Each says what was wrong and what to do about it."""
from __future__ import annotations


class GpuProxyError(Exception):
    """Base class of every error gpu-proxy raises itself."""


class ConfigurationError(GpuProxyError, ValueError):
    """A value the user passed cannot work; raised before anything starts."""


class ClusterResourceError(GpuProxyError):
    """The run asks for more than the cluster has."""


class ShippingError(GpuProxyError, TypeError):
    """An object of the run cannot be sent to the workers."""


class RemoteError(GpuProxyError):
    """An exception raised on a worker that could not be rebuilt here (its class is not importable)."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}\n\nRemote traceback:\n{remote_traceback}")
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class WorkerLostError(GpuProxyError):
    """A worker process or its node died during the run."""


class RunStoppedError(GpuProxyError):
    """The cluster stopped the run gracefully (its budget was spent, say): the workers stopped at a
    step boundary and saved a checkpoint first. ``outcomes`` are the run's outcomes as it ended, so
    the caller can still bring the trained state home."""

    def __init__(self, reason: str, outcomes: list | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcomes = outcomes or []


class RunInterrupted(KeyboardInterrupt):
    """The user stopped the run (Ctrl-C): the workers stopped together at a step boundary. Raised by
    ``gpu_proxy.runs.home.execute`` in place of a bare ``KeyboardInterrupt``; ``outcomes`` are the
    run's outcomes as it ended, so the caller can bring the trained-so-far state home first, as a
    local run keeps it. Empty when the run was aborted (a second Ctrl-C) and nothing came back."""

    def __init__(self, message: str = "the remote run was stopped", outcomes: list | None = None) -> None:
        super().__init__(message)
        self.outcomes = outcomes or []
