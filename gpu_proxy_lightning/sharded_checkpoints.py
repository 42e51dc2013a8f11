"""Sharded checkpoints on any fsspec URL, committed as one checkpoint.

Layout, for a checkpoint Lightning names ``<dir>/<name>`` (e.g. ``epoch=1-step=8.ckpt``)::

    <dir>/<name>                                 the manifest: Lightning's checkpoint without its tensors,
                                                 plus where its shards are; committed like any checkpoint
    <dir>/.gpu-proxy-shards/<name>.<version>/    the shards, written by every rank at once
                                                 (``torch.distributed.checkpoint``: one file per rank
                                                 and a ``.metadata``)

Every save writes its shards to a new ``<version>`` folder; only once all ranks have written theirs
does rank 0 commit the manifest (:mod:`gpu_proxy.storage.commit`, through the run's checkpoint IO).
A crash at any point leaves the previous manifest committed and pointing at its own, untouched
shards, so the last good checkpoint is never corrupted; resume (``latest_committed``) sees a sharded
checkpoint exactly as a plain one. Older versions of a name are deleted after the new one commits.

:func:`read_full_checkpoint` and :func:`consolidate_checkpoint` turn a sharded checkpoint into the
plain Lightning checkpoint a local run would have written, in one process, without a process group.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from typing import Any

import torch

from gpu_proxy.storage.location import join, resolve, split
from gpu_proxy.storage.publish import publisher_for

SHARDS_DIR = ".gpu-proxy-shards"
MANIFEST_KEY = "gpu_proxy_shards"  # in a manifest: {"format": ..., "folder": "<name>.<version>"}
FORMAT = "torch.distributed.checkpoint/1"


def is_manifest(checkpoint: dict[str, Any]) -> bool:
    return isinstance(checkpoint.get(MANIFEST_KEY), dict)


def shards_url(checkpoint_url: str, manifest: dict[str, Any]) -> str:
    parent, _ = split(checkpoint_url)
    return join(join(parent, SHARDS_DIR), manifest[MANIFEST_KEY]["folder"])


def storage_options_of(strategy: Any) -> dict[str, Any] | None:
    return getattr(strategy.checkpoint_io, "storage_options", None)


def save(strategy: Any, tensors: dict[str, Any], rest: dict[str, Any], url: str) -> None:
    """Collective: every rank writes its shards of ``tensors``; then rank 0 commits ``rest`` as the manifest."""
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    options = storage_options_of(strategy) or {}
    parent, name = split(url)
    folder = f"{name}.{strategy.broadcast(uuid.uuid4().hex[:12])}"  # one new folder for all ranks
    dcp_save(tensors, storage_writer=FsspecWriter(join(join(parent, SHARDS_DIR), folder), **options))
    strategy.barrier("gpu_proxy_shards_written")  # every rank's shards are in place before the commit
    if strategy.is_global_zero:
        rest[MANIFEST_KEY] = {"format": FORMAT, "folder": folder, "world_size": strategy.world_size}
        strategy.checkpoint_io.save_checkpoint(rest, url)
        _wait(strategy.checkpoint_io)  # committed: only now may older versions of this name go
        remove_versions(url, options, keep=folder)
    strategy.barrier("gpu_proxy_manifest_committed")


def remove(strategy: Any, url: str) -> None:
    """Rank 0: un-commit and delete the manifest (as any checkpoint), then its shards."""
    strategy.checkpoint_io.remove_checkpoint(url)
    _wait(strategy.checkpoint_io)  # the manifest is gone before the shards it names
    remove_versions(url, storage_options_of(strategy), keep=None)


def remove_versions(url: str, storage_options: dict[str, Any] | None, keep: str | None) -> None:
    """Delete the shard folders of checkpoint ``url`` except ``keep`` (also what a crashed save left)."""
    fs, path = resolve(url, storage_options)
    parent, name = split(path)
    shards_root = join(parent, SHARDS_DIR)
    fs.invalidate_cache(shards_root)
    with contextlib.suppress(FileNotFoundError):
        for folder in fs.ls(shards_root, detail=False):
            base = split(folder)[1]
            if base.rsplit(".", 1)[0] == name and base != keep:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(folder, recursive=True)


def reader(checkpoint_url: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None) -> Any:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(shards_url(checkpoint_url, manifest), **(storage_options or {}))


def _wait(checkpoint_io: Any) -> None:
    wait = getattr(checkpoint_io, "wait", None)  # AsyncFsspecCheckpointIO uploads behind the step loop
    if wait is not None:
        wait()


def _load_manifest(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    fs, path = resolve(url, storage_options)
    with fs.open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=False)


def read_full_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain Lightning checkpoint (``state_dict``, ``optimizer_states``...) of a checkpoint at ``url``.

    A sharded checkpoint's shards are read and joined here, in this process (it must hold the whole
    model in memory); a plain checkpoint is returned as it is.
    """
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    checkpoint = _load_manifest(url, storage_options)
    if not is_manifest(checkpoint):
        return checkpoint
    tensors: dict[str, Any] = {}
    _load_state_dict(tensors, storage_reader=reader(url, checkpoint, storage_options),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint.pop(MANIFEST_KEY)
    checkpoint["state_dict"] = tensors.pop("model")
    optimizer_keys = sorted((k for k in tensors if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    if optimizer_keys:
        checkpoint["optimizer_states"] = [tensors.pop(k) for k in optimizer_keys]
    return checkpoint


def consolidate_checkpoint(url: str, output_url: str | None = None,
                           storage_options: dict[str, Any] | None = None) -> str:
    """Write the sharded checkpoint at ``url`` as one plain file; return its URL.

    The result loads anywhere a local run's checkpoint does: ``MyModel.load_from_checkpoint(...)``,
    ``torch.load``, ``Trainer.fit(ckpt_path=...)``. Default ``output_url``: beside the checkpoint,
    ``<name>.full.ckpt`` (not a committed checkpoint of the run, so resume never picks it). Run it
    where the whole model fits in memory: at home, or on a cluster node with access to the storage.
    """
    checkpoint = read_full_checkpoint(url, storage_options)
    if output_url is None:
        output_url = (url[: -len(".ckpt")] if url.endswith(".ckpt") else url) + ".full.ckpt"
    fs, path = resolve(output_url, storage_options)
    fd, local_path = tempfile.mkstemp(suffix=".ckpt")
    try:
        with os.fdopen(fd, "wb") as spooled:
            torch.save(checkpoint, spooled)
        fs.makedirs(split(path)[0], exist_ok=True)
        publisher_for(fs).put_file(fs, local_path, path, lambda: None)  # whole, or not at all
    finally:
        os.unlink(local_path)
    return output_url
