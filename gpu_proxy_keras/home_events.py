"""The home side of a Keras run's event stream: a real CallbackList, driven by rank 0's hooks.

The list holds Keras' own ``History`` (for ``fit``), Keras' own progress bar (as ``verbose`` asks)
and the user's ``home_callbacks``, with the local model attached; it is built when the remote
``on_*_begin`` arrives, from the remote ``params`` (epochs, steps), so totals match the run.
"""
from __future__ import annotations

import sys
from typing import Any

import keras

from gpu_proxy import events
from gpu_proxy.events import Event

_BEGIN_HOOKS = ("on_train_begin", "on_test_begin", "on_predict_begin")


class HomeEventHandler:
    def __init__(self, model: Any, verbose: Any, home_callbacks: list[Any], add_history: bool) -> None:
        self._model = model
        self._verbose = verbose
        self._home_callbacks = list(home_callbacks)
        self._add_history = add_history
        self.callbacks: keras.callbacks.CallbackList | None = None
        self.history: keras.callbacks.History | None = None

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
        if self.callbacks is None:
            if hook not in _BEGIN_HOOKS:
                return  # e.g. fit's validation hooks come inside the train list; nothing to start here
            self._start(data.get("params", {}))
        getattr(self.callbacks, hook)(*data["args"], logs=data["logs"] or None)

    def _start(self, params: dict[str, Any]) -> None:
        self.callbacks = keras.callbacks.CallbackList(
            self._home_callbacks, add_history=self._add_history, add_progbar=self._verbose != 0,
            model=self._model, **{**params, "verbose": self._verbose})
        self.history = next((c for c in self.callbacks.callbacks
                             if isinstance(c, keras.callbacks.History)), None)
