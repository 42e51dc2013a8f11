"""The user's ``fit`` callbacks as one rank runs them.

Every rank runs every callback that changes training (EarlyStopping, ReduceLROnPlateau, ...), so
all ranks take the same decisions from the same all-reduced logs. Keras callbacks know nothing of
ranks, so callbacks that only write files run on rank 0 alone. (BackupAndRestore both writes and
changes training; with several workers it is refused at home, see ``arguments.py``.)
"""
from __future__ import annotations

from typing import Any

import keras

_WRITE_ONLY = (keras.callbacks.ModelCheckpoint, keras.callbacks.CSVLogger, keras.callbacks.TensorBoard)


def for_rank(callbacks: list[Any], rank: int) -> list[Any]:
    if rank == 0:
        return list(callbacks)
    return [callback for callback in callbacks if not isinstance(callback, _WRITE_ONLY)]
