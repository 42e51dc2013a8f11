"""The worker-side Keras callback that feeds the run's event stream.

Rank 0 forwards every callback hook home as ``{"hook", "args", "logs"}`` so that home can replay it
on a real ``CallbackList`` (History, progress bar, home callbacks); the logs of a multi-worker run
are already averaged across workers, so rank 0's are the run's. Every rank checks home's stop
request at epoch ends; the ranks of a multi-worker TensorFlow fit agree on it there (see
:func:`agreed_stop`).
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np

from gpu_proxy import events

# Hooks that home replays; batch-begin hooks are left out: nothing at home draws from them.
_FORWARDED = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_end",
              "on_test_begin", "on_test_end", "on_test_batch_end", "on_predict_begin", "on_predict_end",
              "on_predict_batch_end")


def plain_logs(logs: Any) -> dict[str, float]:
    """Keras logs as plain floats (they may hold tensors or numpy scalars)."""
    plain = {}
    for key, value in (logs or {}).items():
        try:
            plain[key] = float(np.asarray(value))
        except (TypeError, ValueError):  # e.g. predict outputs: not a metric, not sent
            continue
    return plain


class WorkerEventCallback(keras.callbacks.Callback):
    def __init__(self, ctx: Any) -> None:
        super().__init__()
        self._ctx = ctx
        self._sends = ctx.rank == 0

    def _send(self, hook: str, *args: Any, logs: Any = None) -> None:
        if not self._sends:
            return
        kind = events.METRICS if hook == "on_epoch_end" else events.PROGRESS
        data: dict[str, Any] = {"hook": hook, "args": list(args), "logs": plain_logs(logs)}
        if hook in ("on_train_begin", "on_test_begin", "on_predict_begin"):
            data["params"] = {k: v for k, v in self.params.items() if isinstance(v, (int, float, str, type(None)))}
        self._ctx.emit(kind, data)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._send("on_epoch_end", epoch, logs=logs)
        if agreed_stop(self.model, self._ctx.should_stop()):
            self.model.stop_training = True


def agreed_stop(model: Any, stop: bool) -> bool:
    """Whether to stop, the same on every rank: any rank's stop stops all of them.

    Each rank learns of home's stop request on its own, so at one epoch end a rank may have it and
    its peer not yet; one that stopped alone would leave the other waiting in the next epoch's
    all-reduce (or fail it). Under MultiWorkerMirroredStrategy every rank runs this at every epoch
    end, so a sum across the replicas is one more small collective per epoch, never a wait.
    """
    strategy = getattr(model, "_distribute_strategy", None)  # set by Keras' TensorFlow trainer only
    if strategy is None:
        return stop
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return stop
    votes = strategy.run(lambda: tf.constant(1.0 if stop else 0.0))
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)) > 0


def _forwarder(hook: str) -> Any:
    if hook in ("on_train_begin", "on_train_end", "on_test_begin", "on_test_end",
                "on_predict_begin", "on_predict_end"):
        def forward(self: WorkerEventCallback, logs: Any = None) -> None:
            self._send(hook, logs=logs)
    else:
        def forward(self: WorkerEventCallback, index: int, logs: Any = None) -> None:
            self._send(hook, index, logs=None if hook == "on_predict_batch_end" else logs)
    forward.__name__ = hook
    return forward


class WorkerBatchEventCallback(WorkerEventCallback):
    """Also forwards every batch's end: only when home draws a progress bar or a home callback has a
    batch hook. Keras makes every step wait for its logs while any callback has a batch-end hook
    (no async dispatch), which costs a realistic run seconds (see docs/performance-keras.md)."""


_BATCH_HOOKS = ("on_train_batch_end", "on_test_batch_end", "on_predict_batch_end")

for _hook in _FORWARDED:
    if _hook != "on_epoch_end":
        owner = WorkerBatchEventCallback if _hook in _BATCH_HOOKS else WorkerEventCallback
        setattr(owner, _hook, _forwarder(_hook))


def for_job(ctx: Any, batch_events: bool) -> WorkerEventCallback:
    return WorkerBatchEventCallback(ctx) if batch_events else WorkerEventCallback(ctx)
