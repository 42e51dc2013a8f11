"""Callbacks of the user's project used by the Keras tests."""
from __future__ import annotations

import time

import keras


class SlowEpochs(keras.callbacks.Callback):
    """Runs on the workers: makes each epoch last a while, so 'live' can be told from 'at the end'."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def on_epoch_end(self, epoch, logs=None):
        time.sleep(self.seconds)


class EpochClock(keras.callbacks.Callback):
    """Runs at home: records when each epoch's end arrived, with its logs and the remote params."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[int, float, dict]] = []
        self.params_seen: dict = {}
        self.model_seen = None

    def on_train_begin(self, logs=None):
        self.params_seen = dict(self.params)
        self.model_seen = self.model

    def on_epoch_end(self, epoch, logs=None):
        self.arrivals.append((epoch, time.monotonic(), dict(logs or {})))


class FailAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise ValueError(f"deliberate failure at epoch {epoch}")


class KillOnceAtEpoch(keras.callbacks.Callback):
    """Runs on the workers: SIGKILLs its own process when `epoch` begins, the first time only
    (a marker file remembers it; always=True kills every time)."""

    def __init__(self, epoch: int, marker: str, always: bool = False) -> None:
        super().__init__()
        self.epoch = epoch
        self.marker = marker
        self.always = always

    def on_epoch_begin(self, epoch, logs=None):
        import os
        import signal

        if epoch == self.epoch and (self.always or not os.path.exists(self.marker)):
            with open(self.marker, "a") as file:
                file.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class MarkTrainBegin(keras.callbacks.Callback):
    """Runs on the workers: leaves a file behind when training starts."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        with open(self.path, "w") as file:
            file.write("started\n")
