"""Turn an exception from an fsspec backend into a StorageError in plain words.

Backends wrap their errors differently (s3fs maps S3 codes onto OSError subclasses and chains the
botocore error), so the whole cause chain is inspected, by type and by the service's error code.
"""
from __future__ import annotations

import socket
from typing import Any, Iterator

from gpu_proxy.storage.errors import StorageError
from gpu_proxy.storage.redact import redact

_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "TokenRefreshRequired", "AuthFailure", "InvalidClientTokenId",
                     "Access Key Id you provided does not exist", "security token included in the request",
                     "Authentication failed")
_NO_CREDENTIAL_CODES = ("NoCredentialsError", "PartialCredentialsError", "Unable to locate credentials",
                        "DefaultCredentialsError")
_NO_BUCKET_CODES = ("NoSuchBucket", "specified bucket does not exist", "InvalidBucketName")
_UNREACHABLE_NAMES = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                      "ClientConnectorError", "ServerTimeoutError", "NewConnectionError")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _mentions(exc: BaseException, needles: tuple[str, ...]) -> bool:
    return any(any(n in f"{type(e).__name__} {e}" for n in needles) for e in _chain(exc))


def _reason_of(exc: BaseException) -> tuple[str, str]:
    """(reason code, plain-words cause with the fix)."""
    chain = list(_chain(exc))
    if _mentions(exc, _NO_CREDENTIAL_CODES):
        return "no_credentials", ("no credentials were found. Pass them in storage_options (for S3: key and "
                                  "secret) or through the environment (for S3: AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
    if _mentions(exc, _CREDENTIAL_CODES):
        return "credentials", ("the credentials were rejected (unknown access key, bad secret or expired "
                               "token). Check the key/secret/token in storage_options or the environment")
    if _mentions(exc, _NO_BUCKET_CODES):
        return "no_bucket", "the bucket does not exist (or its name is invalid). Create it or fix the URL"
    if any(isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) for e in chain) or \
            any(type(e).__name__ in _UNREACHABLE_NAMES for e in chain):
        return "unreachable", ("the storage endpoint could not be reached. Check the endpoint URL, the "
                               "network, and that the service is running")
    if any(isinstance(e, PermissionError) for e in chain) or _mentions(exc, ("AccessDenied", "Forbidden")):
        return "permission", ("access was denied: these credentials may not write (or delete) here. "
                              "Grant write and delete permission on this location")
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return "not_found", "a parent of this location does not exist. Create it or fix the URL"
    return "other", "the storage backend raised an error"


def storage_error(exc: BaseException, url: str, storage_options: dict[str, Any] | None,
                  doing: str, error_class: type[StorageError] = StorageError) -> StorageError:
    """A StorageError for `exc`, raised while `doing` something at `url`; no secret in its text.

    Raise it `from None`: the original chain may hold request details that include credentials.
    """
    reason, cause = _reason_of(exc)
    shown_url = redact(url, storage_options)
    detail = redact(f"{type(exc).__name__}: {exc}", storage_options)
    error = error_class(f"Cannot {doing} {shown_url}: {cause}. ({detail})", url=shown_url, reason=reason)
    return error
