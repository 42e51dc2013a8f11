"""Turn a URL and its storage_options into an fsspec filesystem, or a plain-words error.

Resolution fails before any I/O for two reasons users hit often: a mistyped protocol, and a
protocol whose fsspec implementation is not installed. Both get the fix in the message.
"""
from __future__ import annotations

import difflib
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

from gpu_proxy.storage.diagnose import storage_error
from gpu_proxy.storage.errors import StorageError
from gpu_proxy.storage.redact import redact

# protocol -> the install command that brings its fsspec implementation.
_INSTALL_HINTS = {
    "s3": 'pip install "gpu-proxy[s3]"',
    "s3a": 'pip install "gpu-proxy[s3]"',
    "sftp": 'pip install "gpu-proxy[sftp]"',
    "ssh": 'pip install "gpu-proxy[sftp]"',
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
    "abfss": "pip install adlfs",
    "adl": "pip install adlfs",
}
_COMMON_PROTOCOLS = ["s3", "gs", "az", "file", "sftp", "memory"]


def protocol_of(url: str) -> str:
    """The first protocol of `url` ("file" for a plain path)."""
    head = url.split("::", 1)[0]
    return head.split("://", 1)[0] if "://" in head else "file"


def close_protocols(protocol: str) -> list[str]:
    known = sorted(set(fsspec.available_protocols()) | set(_COMMON_PROTOCOLS))
    return difflib.get_close_matches(protocol, known, n=3, cutoff=0.5)


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the path inside it for `url`; StorageError if fsspec cannot serve it."""
    shown_url = redact(url, storage_options)
    protocol = protocol_of(url)
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        hint = _INSTALL_HINTS.get(protocol)
        detail = redact(str(exc), storage_options)
        fix = f"Install it with: {hint}" if hint else f"fsspec says: {detail}"
        raise StorageError(
            f"Cannot use {shown_url}: the fsspec implementation for '{protocol}://' is not installed. {fix}",
            url=shown_url, reason="missing_extra") from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise StorageError(f"Cannot use {shown_url}: {redact(str(exc), storage_options)}",
                               url=shown_url, reason="bad_url") from None
        close = close_protocols(protocol)
        suggestion = (f"Did you mean {', '.join(p + '://' for p in close)}?" if close
                      else f"Known protocols include {', '.join(p + '://' for p in _COMMON_PROTOCOLS)}.")
        raise StorageError(f"Cannot use {shown_url}: unknown protocol '{protocol}://'. {suggestion}",
                           url=shown_url, reason="unknown_protocol") from None
    except TypeError as exc:
        # A filesystem class refused one of the storage_options (a typo or the wrong backend's name).
        raise StorageError(
            f"Cannot use {shown_url}: the '{protocol}://' filesystem does not accept these storage_options "
            f"({redact(str(exc), storage_options)}). Check the option names against its documentation.",
            url=shown_url, reason="bad_storage_options") from None
    except Exception as exc:
        # Some filesystems connect when they are created (sftp://): refused, unknown host, bad login.
        raise storage_error(exc, url, storage_options, "connect to") from None


def join(parent: str, name: str) -> str:
    return f"{parent.rstrip('/')}/{name}"


def split(path: str) -> tuple[str, str]:
    """(parent, basename) of an fsspec path."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent, name
