"""The home side of a Keras run's event stream: a real CallbackList, driven by rank 0's hooks.

The list holds Keras' own ``History`` (for ``fit``), Keras' own progress bar (as ``verbose`` asks)
and the user's ``home_callbacks``, with the local model attached; it is built when the remote
``on_*_begin`` arrives, from the remote ``params`` (epochs, steps), so totals match the run.

A home callback that raises (optuna_integration's ``KerasPruningCallback`` raises
``optuna.TrialPruned``) or sets ``model.stop_training`` (``EarlyStopping`` at home) stops the run
through its RunControl, the stop Ctrl-C and a spent budget use: the workers end their fit at their
next epoch end. ``RemoteFit.fit`` then takes the trained-so-far state in and raises that exception
(``home_error``), or returns the History as a local fit stopped this way does (``stopped_by_callback``).
After a home callback raised, no further hook reaches the home callbacks; after one set
``stop_training``, only ``on_train_end`` does: the epoch the workers train before they see the stop
is not shown to them (locally there is none), but the model holds it.
"""
from __future__ import annotations

import sys
from typing import Any

import keras

from gpu_proxy import events
from gpu_proxy.events import Event

_BEGIN_HOOKS = ("on_train_begin", "on_test_begin", "on_predict_begin")


def worker_halves(home_callbacks: list[Any]) -> list[Any]:
    """The workers' part of home callbacks that have one (``worker_callback()``, e.g.
    ``gpu_proxy_keras.tune.TuneReportCallback`` saves the model there before rank 0 sends its epoch's
    end): shipped to the workers after the user's ``fit`` callbacks."""
    halves = [callback.worker_callback() for callback in home_callbacks
              if callable(getattr(callback, "worker_callback", None))]
    return [half for half in halves if half is not None]


class HomeEventHandler:
    def __init__(self, model: Any, verbose: Any, home_callbacks: list[Any], add_history: bool) -> None:
        self._model = model
        self._verbose = verbose
        self._home_callbacks = list(home_callbacks)
        self._add_history = add_history
        self.callbacks: keras.callbacks.CallbackList | None = None
        self.history: keras.callbacks.History | None = None
        self.home_error: BaseException | None = None  # the first exception a home callback raised
        self.stopped_by_callback = False  # a home callback set model.stop_training
        self._fitting = False

    @property
    def wants_batches(self) -> bool:
        """Whether anything at home draws from batch ends: the progress bar or a home batch hook."""
        if self._verbose != 0:
            return True
        return any(getattr(type(callback), hook) is not getattr(keras.callbacks.Callback, hook)
                   for callback in self._home_callbacks
                   for hook in ("on_batch_end", "on_train_batch_end", "on_test_batch_end",
                                "on_predict_batch_end"))

    def handle(self, event: Event) -> None:
        if event.kind == events.LOG:
            stream = sys.stderr if event.data.get("stream") == "stderr" else sys.stdout
            stream.write(f"(rank {event.rank}) {event.data['line']}\n")
            stream.flush()
        elif event.kind in (events.PROGRESS, events.METRICS) and "hook" in event.data:
            self._replay(event.data)

    def _replay(self, data: dict[str, Any]) -> None:
        hook = data["hook"]
        if self.home_error is not None:
            return  # the run is stopping because a home callback raised: no more hooks, as locally
        if self.stopped_by_callback and hook != "on_train_end":
            return  # locally the fit ends at the epoch that set stop_training; the workers' next one is extra
        if self.callbacks is None:
            if hook not in _BEGIN_HOOKS:
                return  # e.g. fit's validation hooks come inside the train list; nothing to start here
            self._fitting = hook == "on_train_begin"
            if self._fitting:
                self._model.stop_training = False  # as Keras' fit does at its start
            self._start(data.get("params", {}))
        try:
            getattr(self.callbacks, hook)(*data["args"], logs=data["logs"] or None)
        # SystemExit too: ray.tune.report exits the trainable's thread once Tune stopped the trial (ASHA),
        # and the run's workers must stop first (gpu_proxy_keras/tune.py).
        except (Exception, SystemExit) as error:  # noqa: BLE001 - it ends the run; fit raises it at the end
            self.home_error = error
            self._stop_run(f"a home callback raised {type(error).__name__}: {error}")
            return
        if self._fitting and getattr(self._model, "stop_training", False) and not self.stopped_by_callback:
            self.stopped_by_callback = True
            self._stop_run("a home callback set model.stop_training")

    def _stop_run(self, reason: str) -> None:
        """Ask the run whose events come to this handler to stop at its next epoch end on every rank."""
        from gpu_proxy.clusters.base import all_active_runs

        for control in all_active_runs():
            if control.on_event == self.handle:
                control.request_stop(reason)

    def raise_home_error(self) -> None:
        """Raise what a home callback raised during the run, if one did (after the run ended)."""
        if self.home_error is not None:
            raise self.home_error

    def _start(self, params: dict[str, Any]) -> None:
        self.callbacks = keras.callbacks.CallbackList(
            self._home_callbacks, add_history=self._add_history, add_progbar=self._verbose != 0,
            model=self._model, **{**params, "verbose": self._verbose})
        self.history = next((c for c in self.callbacks.callbacks
                             if isinstance(c, keras.callbacks.History)), None)
