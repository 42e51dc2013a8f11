"""How a blob becomes visible at its final key without ever being seen half-written.

Two ways, picked by what the filesystem guarantees:

- `DirectPut` for object stores (S3, GCS, Azure Blob): a PUT or a multipart upload is
  all-or-nothing; readers see the old object or the new one, never a prefix. Writing straight to
  the final key costs nothing extra, where stage-then-copy would move every byte twice.
- `StageThenMove` for everything else: write under a unique staging name, then `mv` it into
  place. On a local disk `mv` is a rename, atomic even when it replaces a file. On other
  filesystems (SFTP, custom ones) we cannot know, so the replace is treated as non-atomic
  (`atomic_replace = False`): once the new payload is fully staged, `before_replace` runs (the
  commit protocol un-commits the old checkpoint there) and only then is the old file replaced.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from typing import Callable, Protocol

from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from gpu_proxy.storage.location import join, split

STAGING_DIR = ".gpu-proxy-staging"
STAGING_SUFFIX = ".partial"
# Protocols whose single-object writes are all-or-nothing by the store's own contract.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def _nothing() -> None:
    pass


class Publisher(Protocol):
    atomic_replace: bool  # True when replacing an existing key never exposes a partial or missing object

    def put_file(self, fs: AbstractFileSystem, local_path: str, path: str,
                 before_replace: Callable[[], None] = _nothing) -> None: ...

    def put_bytes(self, fs: AbstractFileSystem, data: bytes, path: str,
                  before_replace: Callable[[], None] = _nothing) -> None: ...


class DirectPut:
    atomic_replace = True

    def put_file(self, fs: AbstractFileSystem, local_path: str, path: str,
                 before_replace: Callable[[], None] = _nothing) -> None:
        fs.put_file(local_path, path)

    def put_bytes(self, fs: AbstractFileSystem, data: bytes, path: str,
                  before_replace: Callable[[], None] = _nothing) -> None:
        fs.pipe_file(path, data)


class StageThenMove:
    def __init__(self, atomic_replace: bool) -> None:
        self.atomic_replace = atomic_replace

    def put_file(self, fs: AbstractFileSystem, local_path: str, path: str,
                 before_replace: Callable[[], None] = _nothing) -> None:
        self._publish(fs, path, lambda staging: fs.put_file(local_path, staging), before_replace)

    def put_bytes(self, fs: AbstractFileSystem, data: bytes, path: str,
                  before_replace: Callable[[], None] = _nothing) -> None:
        self._publish(fs, path, lambda staging: fs.pipe_file(staging, data), before_replace)

    def _publish(self, fs: AbstractFileSystem, path: str, write: Callable[[str], None],
                 before_replace: Callable[[], None]) -> None:
        staging = staging_path(path)
        fs.makedirs(split(staging)[0], exist_ok=True)
        try:
            write(staging)
            if not self.atomic_replace:
                before_replace()
                if fs.exists(path):
                    # Some backends refuse to rename over an existing file (SFTP v3 does).
                    fs.rm_file(path)
            fs.mv(staging, path)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm_file(staging)
            raise


def staging_path(path: str) -> str:
    """A unique name beside `path`'s directory; its creation time is in the name for orphan cleanup."""
    parent, name = split(path)
    return join(join(parent, STAGING_DIR), f"{name}.{time.time_ns()}.{uuid.uuid4().hex[:8]}{STAGING_SUFFIX}")


def staging_time_ns(staging_name: str) -> int | None:
    """The creation time encoded by `staging_path`, or None for a name it did not make."""
    if not staging_name.endswith(STAGING_SUFFIX):
        return None
    parts = staging_name[: -len(STAGING_SUFFIX)].rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _protocols(fs: AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def is_object_store(fs: AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & ATOMIC_PUT_PROTOCOLS)


def publisher_for(fs: AbstractFileSystem) -> Publisher:
    if is_object_store(fs):
        return DirectPut()
    return StageThenMove(atomic_replace=isinstance(fs, LocalFileSystem))
