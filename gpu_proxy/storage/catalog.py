"""URL-level questions about a checkpoint directory: what is committed, and which is newest."""
from __future__ import annotations

from typing import Any

from gpu_proxy.storage import commit
from gpu_proxy.storage.commit import CommittedCheckpoint
from gpu_proxy.storage.location import join, resolve


def list_committed(dir_url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URLs of the committed checkpoints directly under `dir_url`, oldest commit first.

    URLs are spelled like `dir_url` (same protocol and prefix), so they open with the same options.
    """
    fs, dir_path = resolve(dir_url, storage_options)
    return [join(dir_url, c.name) for c in commit.committed_in(fs, dir_path)]


def committed_details(dir_url: str, storage_options: dict[str, Any] | None = None) -> list[CommittedCheckpoint]:
    """What the markers under `dir_url` say (name, size, commit time, writer's meta), oldest first."""
    fs, dir_path = resolve(dir_url, storage_options)
    return commit.committed_in(fs, dir_path)


def latest_committed(dir_url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """URL of the most recently committed checkpoint under `dir_url`, or None if there is none."""
    committed = list_committed(dir_url, storage_options)
    return committed[-1] if committed else None


def is_committed(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = resolve(url, storage_options)
    return commit.is_committed(fs, path)


def remove_committed(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Un-commit and delete the checkpoint at `url`."""
    fs, path = resolve(url, storage_options)
    commit.remove(fs, path)


def remove_orphans(dir_url: str, storage_options: dict[str, Any] | None = None,
                   min_age_s: float = 3600.0) -> list[str]:
    """Delete leftovers of killed writers under `dir_url` (see `commit.remove_orphans`)."""
    fs, dir_path = resolve(dir_url, storage_options)
    return commit.remove_orphans(fs, dir_path, min_age_s)
