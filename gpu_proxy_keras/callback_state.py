"""The user's callbacks come home holding what rank 0's copies held when the run ended.

Locally a callback object is the one that ran, so ``EarlyStopping.stopped_epoch``, a custom
callback's counters or recorded batches are read after ``fit``. Remotely the callbacks that ran are
rank 0's unpickled copies, so rank 0 sends each one's plain-data attributes (numbers, strings,
numpy arrays, containers of them: ``best``, ``wait``, ``best_weights``, lists of batches) and home
sets them on the user's objects, matched by position in the user's list. References (the model,
functions such as ``monitor_op``, files, summary writers) are never sent: home keeps its own, and
attaches its local model, as Keras leaves ``callback.model`` set to the model after ``fit``.
"""
from __future__ import annotations

from pathlib import PurePath
from typing import Any

import numpy as np

_PLAIN = (type(None), bool, int, float, complex, str, bytes, PurePath, np.ndarray, np.generic)
_MAX_DEPTH = 4  # e.g. a dict of lists of per-batch dicts of floats
# Set by Keras on each run: home attaches the local model itself, and params get home's verbose.
_NEVER = ("_model", "model")


def capture(callbacks: list[Any]) -> list[dict[str, Any]]:
    """Each callback's plain attributes, in the order of the user's list (rank 0, after the run)."""
    states = []
    for callback in callbacks:
        plain = ((key, _plain(value)) for key, value in vars(callback).items() if key not in _NEVER)
        states.append({key: value for key, value in plain if value is not _SKIP})
    return states


def restore(callbacks: list[Any], states: list[dict[str, Any]], model: Any, verbose: Any) -> None:
    """Set rank 0's attributes on the user's callback objects and attach the local model."""
    if len(states) != len(callbacks):  # the same list was shipped: a mismatch is a bug of ours
        raise RuntimeError(f"rank 0 sent the state of {len(states)} callbacks for the {len(callbacks)} given")
    for callback, state in zip(callbacks, states):
        for key, value in state.items():
            if key == "params" and isinstance(value, dict):
                value = dict(value, verbose=verbose)  # workers always run with verbose=0
            setattr(callback, key, value)
        # Keras' own storage of callback.model, not set_model(): a subclass's set_model may act
        # (TensorBoard's writes its graph summary), and that already happened on the worker.
        callback._model = model


_SKIP = object()
_TENSOR_MODULES = ("tensorflow", "jax", "jaxlib", "torch")


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as plain data (a backend tensor becomes a numpy array), or ``_SKIP``."""
    if isinstance(value, np.ndarray):
        return value if value.dtype != object else _SKIP
    if isinstance(value, _PLAIN):
        return value
    if type(value).__module__.split(".")[0] in _TENSOR_MODULES and hasattr(value, "__array__") \
            and "Variable" not in type(value).__name__:  # a value such as batch logs; never model state
        return np.asarray(value)
    if depth >= _MAX_DEPTH:
        return _SKIP
    if type(value) in (list, tuple, set, frozenset):
        items = [_plain(v, depth + 1) for v in value]
        return _SKIP if any(item is _SKIP for item in items) else type(value)(items)
    if type(value) is dict and all(isinstance(k, (str, int)) for k in value):
        items = {k: _plain(v, depth + 1) for k, v in value.items()}
        return _SKIP if any(item is _SKIP for item in items.values()) else items
    return _SKIP
