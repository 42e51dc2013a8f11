"""Lightning callbacks that run at home, beside the user's script, on the metrics the run streams home.

``Trainer(callbacks=[HomeCallback(cb)])``: ``cb`` never travels to the workers. What goes is an empty
shell that, on rank 0, sends home each of :data:`HOME_HOOKS` with the numbers a callback reads
(``trainer.callback_metrics``, ``current_epoch``, ``global_step``, the stage); home sets them on the
home Trainer and calls ``cb``'s hook there (``gpu_proxy_lightning/home_events.py``). So a callback
that holds home-only things (an Optuna trial and its storage, a socket, a GUI) works unchanged:

- it raises (``optuna.TrialPruned`` from optuna_integration's ``PyTorchLightningPruningCallback``):
  the run stops at its next step on every rank, its workers are freed, the model gets the weights
  of that step, and ``fit`` raises that exception at home, as it would locally;
- it sets ``trainer.should_stop`` (``EarlyStopping``): the run stops the same way and ``fit``
  returns normally with the state so far restored, as a local fit that ``should_stop`` ended.

The stop goes through the run's :class:`~gpu_proxy.runs.control.RunControl`, the one Ctrl-C and a
spent budget use: the ranks agree on it every ``STOP_CHECK_EVERY`` batches (worker_events.py).
Hooks not listed here (``setup``, ``on_fit_start``, batch hooks) run on the workers only: home
would see them late or, for batches, thinned out.
"""
from __future__ import annotations

import uuid
from typing import Any

from lightning.pytorch.callbacks import Callback

from gpu_proxy_lightning.worker_events import WorkerEventCallback, _batch_counts, _scalars

HOME_HOOK = "home_hook"  # the event kind the shell sends
HOME_HOOKS = (
    "on_sanity_check_start", "on_sanity_check_end", "on_train_start", "on_train_end",
    "on_train_epoch_start", "on_train_epoch_end", "on_validation_start", "on_validation_epoch_end",
    "on_validation_end", "on_test_start", "on_test_end", "on_fit_end",
)


class HomeCallback(Callback):
    """Run ``callback`` at home, driven by the run's event stream (see the module's docstring).

    Args:
        callback: any Lightning ``Callback``; it stays in this process.
    """

    def __init__(self, callback: Callback) -> None:
        if not isinstance(callback, Callback):
            raise TypeError(f"HomeCallback({callback!r}): give a Lightning Callback, e.g. "
                            "HomeCallback(PyTorchLightningPruningCallback(trial, monitor='val_loss')).")
        self.callback: Callback | None = callback  # None in the workers' copy
        self.id = uuid.uuid4().hex  # how home finds this wrapper again when the shell's event arrives

    def __getstate__(self) -> dict[str, Any]:
        return {"callback": None, "id": self.id}  # the wrapped callback never leaves home

    @property
    def state_key(self) -> str:
        return f"HomeCallback[{self.id}]"

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # At home Lightning calls this when fit raises (a pruned trial, Ctrl-C): as locally.
        if self.callback is not None:
            self.callback.on_exception(trainer, pl_module, exception)

    def _send_home(self, trainer: Any, hook: str) -> None:
        if self.callback is not None or trainer.global_rank != 0:
            return  # at home Lightning never runs these hooks; on other ranks home has rank 0's numbers
        ctx = next((c._ctx for c in trainer.callbacks if isinstance(c, WorkerEventCallback)), None)
        if ctx is None:
            return  # not inside a gpu-proxy run (the Trainer was used locally)
        ctx.emit(HOME_HOOK, {
            "id": self.id, "hook": hook, "callback_metrics": _scalars(trainer.callback_metrics),
            "stage": trainer.state.stage.value if trainer.state.stage else None,
            "fn": trainer.state.fn.value if trainer.state.fn else None,
            "epoch": trainer.current_epoch, "global_step": trainer.global_step,
            "metrics": _scalars(trainer.progress_bar_metrics), **_batch_counts(trainer),
        })


def _relay(hook: str):
    def send(self: HomeCallback, trainer: Any, pl_module: Any) -> None:
        self._send_home(trainer, hook)
    send.__name__ = hook
    return send


for _hook in HOME_HOOKS:
    setattr(HomeCallback, _hook, _relay(_hook))


def home_callbacks(trainer: Any) -> dict[str, HomeCallback]:
    """The trainer's home callbacks (at home: with their wrapped callback), by id."""
    callbacks = getattr(trainer, "callbacks", None) or []
    return {c.id: c for c in callbacks if isinstance(c, HomeCallback) and c.callback is not None}
