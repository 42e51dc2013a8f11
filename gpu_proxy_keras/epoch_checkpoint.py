"""Per-epoch checkpoints of a Keras run: ``<checkpoint_dir>/<run_name>/epoch-NNNN.keras`` on any fsspec URL.

Rank 0 saves the model with Keras' own ``model.save`` to a local temp file at each epoch end and
commits it with the project's storage layer (``gpu_proxy.storage.commit_file``: atomic, visible to
resume logic only once complete). The commit's metadata records the epoch index (``History.epoch``'s
numbering, 0-based; the file name uses Keras' 1-based ``Epoch N/M`` numbering) and the run's History
up to that epoch, so a resumed run knows its ``initial_epoch`` and home can rebuild one History entry
per epoch. Home checks the location before anything starts and reads the newest commit to resume.
"""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import keras

from gpu_proxy.storage import check_writable, commit_file, committed_details, resolve
from gpu_proxy.storage.location import join


def new_run_name() -> str:
    return f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def file_name(epoch: int) -> str:
    return f"epoch-{epoch + 1:04d}.keras"


@dataclass
class Committed:
    """The newest committed epoch of a run: where it is and the History up to it."""
    url: str
    epoch: int  # 0-based, as in History.epoch
    history: dict[str, list[float]] = field(default_factory=dict)
    epochs: list[int] = field(default_factory=list)


class RunCheckpoints:
    """Home's view of one run's checkpoint folder."""

    def __init__(self, checkpoint_dir: str, run_name: str, storage_options: dict[str, Any] | None) -> None:
        self.run_name = run_name
        self.run_url = f"{checkpoint_dir.rstrip('/')}/{run_name}"
        self.storage_options = storage_options

    def check(self) -> None:
        check_writable(self.run_url, self.storage_options)

    def latest(self) -> Committed | None:
        details = [d for d in committed_details(self.run_url, self.storage_options) if "epoch" in d.meta]
        if not details:
            return None
        newest = max(details, key=lambda d: (d.meta["epoch"], d.committed_at_ns))
        return Committed(url=join(self.run_url, newest.name), epoch=int(newest.meta["epoch"]),
                         history=dict(newest.meta.get("history") or {}),
                         epochs=list(newest.meta.get("epochs") or []))

    def read(self, committed: Committed) -> bytes:
        fs, path = resolve(committed.url, self.storage_options)
        return fs.cat_file(path)

    def worker_spec(self, resumed: Committed | None) -> dict[str, Any]:
        """What rank 0's :class:`EpochCheckpoint` is built from (plain values, shipped in the job)."""
        return {"run_url": self.run_url, "storage_options": self.storage_options,
                "history": resumed.history if resumed else {}, "epochs": resumed.epochs if resumed else []}


class EpochCheckpoint(keras.callbacks.Callback):
    """Rank 0 only: save the model locally, then commit it under the run's URL, at every epoch end."""

    def __init__(self, run_url: str, storage_options: dict[str, Any] | None,
                 history: dict[str, list[float]], epochs: list[int]) -> None:
        super().__init__()
        self.run_url = run_url
        self.storage_options = storage_options
        self.history = {key: list(values) for key, values in history.items()}
        self.epochs = list(epochs)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        # Keras has already turned the logs into floats (as its History records them).
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.epochs.append(epoch)
        fs, run_path = resolve(self.run_url, self.storage_options)
        with tempfile.TemporaryDirectory(prefix="gpu-proxy-keras-ckpt-") as folder:
            local = os.path.join(folder, "model.keras")
            self.model.save(local)
            commit_file(fs, local, join(run_path, file_name(epoch)),
                        meta={"epoch": epoch, "epochs": self.epochs, "history": self.history})
