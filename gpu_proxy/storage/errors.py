"""Errors of the storage layer. Their text names the URL and the cause, never a credential."""
from __future__ import annotations

from gpu_proxy.errors import GpuProxyError


class StorageError(GpuProxyError):
    """A checkpoint location cannot be used.

    `reason` is a short machine-readable word for the cause (see `gpu_proxy.storage.diagnose`), so
    callers can branch on it without parsing the message.
    """

    def __init__(self, message: str, *, url: str, reason: str) -> None:
        super().__init__(message)
        self.url = url
        self.reason = reason


class UploadError(StorageError):
    """A checkpoint could not be uploaded or committed in the background."""
