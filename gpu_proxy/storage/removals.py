"""Removals that outlive the process that queued them.

`save_top_k` retention queues "remove the old checkpoint" behind the save of its replacement. A
writer killed after the replacement committed but before the removal ran would leave the old
checkpoint committed for good: the resumed run's `ModelCheckpoint` no longer counts it, so nothing
removes it later. So a removal is first written down beside the checkpoints, as an intent:

    <dir>/.gpu-proxy-removals/<name>.json   {"name", "after": [paths], "requested_at_ns"}

`after` are the uploads that were still in flight when the removal was queued. The writer deletes
the intent once the removal ran. Whoever touches the directory next (a restarted worker's
checkpoint IO) replays what is left: the removal happens if every upload in `after` committed
after the intent was written, and is dropped otherwise (the replacement never committed, so the old
checkpoint is still the last good one). Replaying is safe beside a live writer: it only does, or
declines, what that writer would do itself, and removing twice is harmless.
"""
from __future__ import annotations

import contextlib
import json
from typing import Iterable

from fsspec.spec import AbstractFileSystem

from gpu_proxy.storage import commit
from gpu_proxy.storage.location import join, split
from gpu_proxy.storage.publish import is_object_store

REMOVALS_DIR = ".gpu-proxy-removals"
INTENT_FORMAT = "gpu-proxy-removal/1"


def intent_path(path: str) -> str:
    parent, name = split(path)
    return join(join(parent, REMOVALS_DIR), name + ".json")


def record(fs: AbstractFileSystem, path: str, after: Iterable[str], requested_at_ns: int) -> None:
    """Write down, before queueing it, that `path` goes once every upload in `after` has committed.

    `requested_at_ns` must be taken before `after` was listed, so any of them commits after it.
    """
    intent = intent_path(path)
    if not is_object_store(fs):
        fs.makedirs(split(intent)[0], exist_ok=True)
    fs.pipe_file(intent, json.dumps({"format": INTENT_FORMAT, "name": split(path)[1], "after": list(after),
                                     "requested_at_ns": requested_at_ns}).encode())


def done(fs: AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(intent_path(path))


def _committed_since(fs: AbstractFileSystem, path: str, since_ns: int) -> bool:
    try:
        record_ = json.loads(fs.cat_file(commit.marker_path(path)))
        return int(record_["committed_at_ns"]) >= since_ns and fs.exists(path)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False


def replay(fs: AbstractFileSystem, dir_path: str, keep: Iterable[str] = ()) -> list[str]:
    """Carry out the removals left in `dir_path` by writers that died; return the paths removed.

    A removal of a path in `keep` (the checkpoint about to be loaded, say) is dropped, not done.
    """
    dir_path = dir_path.rstrip("/")
    intents_dir = join(dir_path, REMOVALS_DIR)
    keep = set(keep)
    fs.invalidate_cache(intents_dir)
    try:
        intents = [p for p in fs.ls(intents_dir, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return []
    removed = []
    for intent in intents:
        try:
            wanted = json.loads(fs.cat_file(intent))
            if wanted.get("format") != INTENT_FORMAT:
                continue  # not ours to judge
            target = join(dir_path, wanted["name"])
            after, since = [str(p) for p in wanted["after"]], int(wanted["requested_at_ns"])
        except FileNotFoundError:
            continue  # its writer finished it meanwhile
        except (ValueError, KeyError, TypeError):
            target, after, since = None, [], 0  # cut short by a crash: it never became a queued removal
        # Every intent read is spent now, done or not: one left behind could later match a new
        # commit of the same name and remove a checkpoint the resumed run still counts.
        if target is not None and target not in keep and all(_committed_since(fs, p, since) for p in after):
            commit.remove(fs, target)
            removed.append(target)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(intent)
    if removed:
        commit.forget_listings(fs, dir_path)
    return removed
