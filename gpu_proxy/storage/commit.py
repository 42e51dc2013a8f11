"""The commit protocol: a checkpoint is visible to resume logic only once it is complete.

Layout, for a checkpoint at `<dir>/<name>`:

    <dir>/<name>                                  the payload, a plain file any reader can open
    <dir>/.gpu-proxy-commits/<name>.json          the commit marker, written after the payload
    <dir>/.gpu-proxy-staging/<name>.<t>.<id>.partial   in-flight payloads (not on object stores)

Invariants, on any fsspec filesystem, whatever instant a writer is killed at:

1. A name with a marker has a complete payload. The payload is published atomically (see
   `publish`) before its marker is written; where a filesystem cannot replace a file atomically
   the old marker is deleted (once the new payload is fully staged) before the old file is
   replaced, so a half-replaced payload is never listed.
2. A committed checkpoint stays committed and complete while another one is uploaded, even one
   with the same name. The one exception: on a filesystem without atomic replace, a writer killed
   during the final move of a same-name replacement leaves that name uncommitted.
3. Removal deletes the marker before the payload, so a half-removed checkpoint is not listed.

The payload stays at the exact path Lightning asked for, so `load_from_checkpoint(url)` and any
other tool read it without knowing about markers. Only resume logic needs the markers.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from fsspec.spec import AbstractFileSystem

from gpu_proxy.storage.location import join, split
from gpu_proxy.storage.publish import STAGING_DIR, is_object_store, publisher_for, staging_time_ns

COMMITS_DIR = ".gpu-proxy-commits"
MARKER_SUFFIX = ".json"
MARKER_FORMAT = "gpu-proxy-commit/1"


@dataclass(frozen=True)
class CommittedCheckpoint:
    name: str  # basename of the payload inside its directory
    size: int
    committed_at_ns: int
    meta: dict = field(default_factory=dict)  # what the writer chose to record (e.g. global_step)


def marker_path(path: str) -> str:
    parent, name = split(path)
    return join(join(parent, COMMITS_DIR), name + MARKER_SUFFIX)


def commit_file(fs: AbstractFileSystem, local_path: str, path: str, meta: dict[str, Any] | None = None) -> None:
    """Upload `local_path` to `path` and commit it; `meta` (JSON-able) is kept in the marker."""
    size = os.path.getsize(local_path)
    _commit(fs, path, size, meta,
            lambda publisher, uncommit: publisher.put_file(fs, local_path, path, uncommit))


def commit_bytes(fs: AbstractFileSystem, data: bytes, path: str, meta: dict[str, Any] | None = None) -> None:
    """Write `data` to `path` and commit it; `meta` (JSON-able) is kept in the marker."""
    _commit(fs, path, len(data), meta, lambda publisher, uncommit: publisher.put_bytes(fs, data, path, uncommit))


def _commit(fs: AbstractFileSystem, path: str, size: int, meta: dict[str, Any] | None, write_payload) -> None:
    publisher = publisher_for(fs)
    marker = marker_path(path)
    if not is_object_store(fs):
        fs.makedirs(split(path)[0], exist_ok=True)
    # Called by a non-atomic publisher just before it replaces the old payload.
    write_payload(publisher, lambda: _remove_quietly(fs, marker))
    record = {"format": MARKER_FORMAT, "name": split(path)[1], "size": size,
              "committed_at_ns": time.time_ns(), "host": socket.gethostname(), "pid": os.getpid(),
              "meta": meta or {}}
    publisher.put_bytes(fs, json.dumps(record).encode(), marker)


def remove(fs: AbstractFileSystem, path: str) -> None:
    """Un-commit, then delete, the checkpoint at `path`. Missing pieces are not an error."""
    _remove_quietly(fs, marker_path(path))
    _remove_quietly(fs, path)


def _remove_quietly(fs: AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def _read_marker(raw: bytes, expected_name: str) -> CommittedCheckpoint | None:
    try:
        record = json.loads(raw)
        if record.get("format") != MARKER_FORMAT or record.get("name") != expected_name:
            return None
        return CommittedCheckpoint(expected_name, int(record["size"]), int(record["committed_at_ns"]),
                                   dict(record.get("meta") or {}))
    except (ValueError, KeyError, TypeError):
        return None  # a marker cut short by a crash on a non-atomic filesystem is no commit


def is_managed(fs: AbstractFileSystem, dir_path: str) -> bool:
    """Whether checkpoints in `dir_path` were written with this protocol (it has a commits folder)."""
    return fs.exists(join(dir_path, COMMITS_DIR))


def is_committed(fs: AbstractFileSystem, path: str) -> bool:
    forget_listings(fs, split(path)[0])
    try:
        raw = fs.cat_file(marker_path(path))
    except FileNotFoundError:
        return False
    return _read_marker(raw, split(path)[1]) is not None and fs.exists(path)


def committed_in(fs: AbstractFileSystem, dir_path: str) -> list[CommittedCheckpoint]:
    """The committed checkpoints directly in `dir_path`, oldest commit first."""
    dir_path = dir_path.rstrip("/")
    marker_dir = join(dir_path, COMMITS_DIR)
    forget_listings(fs, dir_path)
    try:
        markers = [p for p in fs.ls(marker_dir, detail=False) if p.endswith(MARKER_SUFFIX)]
        payload_names = {split(p)[1] for p in fs.ls(dir_path, detail=False)}
    except FileNotFoundError:
        return []
    contents = fs.cat(markers, on_error="omit") if markers else {}
    found = []
    for marker, raw in contents.items():
        name = split(marker)[1][: -len(MARKER_SUFFIX)]
        record = _read_marker(raw, name)
        if record is not None and name in payload_names:
            found.append(record)
    return sorted(found, key=lambda c: (c.committed_at_ns, c.name))


def forget_listings(fs: AbstractFileSystem, dir_path: str) -> None:
    """Drop this filesystem instance's cached listings of a checkpoint directory.

    Other processes write there too, so a cached listing may be stale. s3fs's
    `invalidate_cache(path)` clears a path and its parents, not its children: name each.
    """
    for listed in (dir_path, join(dir_path, COMMITS_DIR), join(dir_path, STAGING_DIR)):
        fs.invalidate_cache(listed)


def remove_orphans(fs: AbstractFileSystem, dir_path: str, min_age_s: float = 3600.0) -> list[str]:
    """Delete what killed writers left in `dir_path`; return the paths deleted.

    Removes staging files older than `min_age_s` (younger ones may belong to a live writer) and
    markers whose payload is gone. Payloads without a marker are left alone: they may be files the
    user put there, and they are invisible to resume logic anyway.
    """
    dir_path = dir_path.rstrip("/")
    forget_listings(fs, dir_path)
    deleted = []
    cutoff_ns = time.time_ns() - int(min_age_s * 1e9)
    with contextlib.suppress(FileNotFoundError):
        for staged in fs.ls(join(dir_path, STAGING_DIR), detail=False):
            born = staging_time_ns(split(staged)[1])
            if born is not None and born < cutoff_ns:
                _remove_quietly(fs, staged)
                deleted.append(staged)
    with contextlib.suppress(FileNotFoundError):
        # Markers first: one committed after this listing is not judged against an older payload list.
        markers = fs.ls(join(dir_path, COMMITS_DIR), detail=False)
        payload_names = {split(p)[1] for p in fs.ls(dir_path, detail=False)}
        for marker in markers:
            name = split(marker)[1]
            if name.endswith(MARKER_SUFFIX) and name[: -len(MARKER_SUFFIX)] not in payload_names:
                _remove_quietly(fs, marker)
                deleted.append(marker)
    return deleted
