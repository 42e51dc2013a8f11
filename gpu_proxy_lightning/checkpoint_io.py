"""A Lightning CheckpointIO that writes checkpoints to any fsspec URL without stalling training.

`save_checkpoint` serialises the checkpoint with `torch.save` to a local spool file on the
training thread and returns; the upload and the commit (see `gpu_proxy.storage.commit`) run on a
background thread. `remove_checkpoint` is queued behind earlier saves, so `ModelCheckpoint`'s
`save_top_k` retention never deletes an old checkpoint before its replacement has committed.
`teardown` (called by the Trainer at the end of every fit/validate/test) waits for every upload
and raises an upload failure, so a run never reports success with a checkpoint missing.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from gpu_proxy.secrets import conceal
from gpu_proxy.storage import commit, removals, spool
from gpu_proxy.storage.location import resolve, split
from gpu_proxy.storage.spool import Spool
from gpu_proxy.storage.uploader import BackgroundUploader


def _to_cpu_storage(storage: Any, location: str) -> Any:
    return storage


class AsyncFsspecCheckpointIO(CheckpointIO):
    """Checkpoints on any fsspec URL (`s3://`, `gs://`, `file://`, `sftp://`, ...), committed atomically.

    Args:
        storage_options: fsspec options for every URL this plugin writes or reads (endpoint,
            credentials). `Trainer.save_checkpoint(..., storage_options=...)` overrides them per call.
            Lightning itself (`ModelCheckpoint`, `load_from_checkpoint`) opens URLs with fsspec's
            defaults, so give the same settings through the environment or `fsspec.config.conf`.
        max_pending: checkpoints that may wait behind the one uploading; a save blocks while the
            queue is full, which bounds the spool's disk use to `max_pending + 2` checkpoints.
        spool_dir: where checkpoints are serialised before upload (default: the system temp dir).
        on_commit: called as `on_commit(url, {"epoch": ..., "global_step": ...})` on the upload
            thread once a checkpoint is committed, e.g. to send a "checkpoint committed" event.
    """

    def __init__(self, storage_options: Optional[dict[str, Any]] = None, *, max_pending: int = 1,
                 spool_dir: Optional[str] = None,
                 on_commit: Optional[Callable[[str, dict[str, Any]], None]] = None) -> None:
        self.storage_options = conceal(dict(storage_options)) if storage_options else None  # see gpu_proxy.secrets
        self.max_pending = max_pending
        self.spool_dir = spool_dir
        self.on_commit = on_commit
        self._start()

    def _start(self) -> None:
        self._uploader = BackgroundUploader(self.max_pending)
        self._spool = Spool(self.spool_dir)
        self._replayed: set[tuple[str, str]] = set()  # directories whose leftover removals were replayed

    # The strategy is shipped to remote workers inside the trainer; threads and queues do not pickle.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_uploader", "_spool", "_replayed"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start()
        # A worker starting (or restarting after a kill) reclaims what dead processes left spooled.
        with contextlib.suppress(OSError):
            spool.sweep(self.spool_dir)

    def _replay_removals(self, fs: Any, dir_path: str, keep: tuple[str, ...] = ()) -> None:
        """Once per directory: carry out the save_top_k removals a killed writer had queued there."""
        key = (type(fs).__name__, dir_path)
        if key not in self._replayed:
            removals.replay(fs, dir_path, keep)
            self._replayed.add(key)

    def _options(self, storage_options: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        return storage_options if storage_options is not None else self.storage_options

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Optional[dict[str, Any]] = None) -> None:
        options = self._options(storage_options)
        url = str(path)
        fs, fs_path = resolve(url, options)
        self._replay_removals(fs, split(fs_path)[0])
        fd, local_path = self._spool.new_file()
        try:
            with os.fdopen(fd, "wb") as spooled:
                torch.save(checkpoint, spooled)
        except BaseException:
            os.unlink(local_path)
            raise
        # Recorded in the commit marker, so resume logic can report where it resumes from without a load.
        meta = {key: checkpoint[key] for key in ("epoch", "global_step") if isinstance(checkpoint.get(key), int)}
        self._uploader.submit_file(fs, local_path, fs_path, url=url, storage_options=options, meta=meta,
                                   on_commit=self.on_commit)

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = _to_cpu_storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        # Read-your-writes: a checkpoint saved a moment ago may still be uploading.
        self._uploader.wait()
        url = str(path)
        fs, fs_path = resolve(url, self.storage_options)
        commit.forget_listings(fs, split(fs_path)[0])  # written by another process, maybe
        self._replay_removals(fs, split(fs_path)[0], keep=(fs_path,))
        if not fs.exists(fs_path):
            raise FileNotFoundError(f"Checkpoint file not found: {url}")
        if commit.is_managed(fs, split(fs_path)[0]) and not commit.is_committed(fs, fs_path):
            raise FileNotFoundError(
                f"Checkpoint {url} was never committed (its upload did not finish); "
                "use gpu_proxy.storage.latest_committed(<its directory>) to find the newest complete one.")
        with fs.open(fs_path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        url = str(path)
        fs, fs_path = resolve(url, self.storage_options)
        self._replay_removals(fs, split(fs_path)[0])
        # Durable: written down first, so a kill before it ran does not leave the old checkpoint for good.
        self._uploader.submit_remove(fs, fs_path, url=url, storage_options=self.storage_options, durable=True)

    def wait(self) -> None:
        """Block until every checkpoint saved so far has committed; raise an upload failure."""
        self._uploader.wait()

    def teardown(self) -> None:
        try:
            self._uploader.close()
        finally:
            self._spool.close()
