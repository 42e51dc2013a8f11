"""Check, before any worker starts, that checkpoints can be written where the user asked."""
from __future__ import annotations

import uuid
from typing import Any

from gpu_proxy.storage.diagnose import storage_error
from gpu_proxy.storage.location import join, resolve
from gpu_proxy.storage.publish import is_object_store

PROBE_PREFIX = ".gpu-proxy-write-probe-"


def check_writable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write, read back and delete a small probe object under `url`; raise StorageError if any step fails.

    Delete is checked too: retention (`save_top_k`) and the commit protocol need it.
    Object stores are not asked to create anything but the probe (s3fs `makedirs` on a bucket URL
    would create the bucket, which is not this check's business).
    """
    fs, path = resolve(url, storage_options)
    probe = join(path, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    payload = b"gpu-proxy write probe\n"
    try:
        if not is_object_store(fs):
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, payload)
    except Exception as exc:
        raise storage_error(exc, url, storage_options, "write checkpoints to") from None
    try:
        if fs.cat_file(probe) != payload:
            raise OSError("the probe object read back differs from what was written")
    except Exception as exc:
        raise storage_error(exc, url, storage_options, "read back checkpoints from") from None
    try:
        fs.rm_file(probe)
    except Exception as exc:
        raise storage_error(exc, url, storage_options, "delete checkpoints (needed for retention) in") from None
