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


class KillRankOnceAtEpoch(KillOnceAtEpoch):
    """KillOnceAtEpoch on one rank only (os.environ["RANK"], set on every worker). With
    `committed_in` (a checkpoint_dir) it first waits until the previous epoch is committed there, so
    the run that follows has a known epoch to resume from."""

    def __init__(self, epoch: int, marker: str, rank: int, committed_in: str | None = None) -> None:
        super().__init__(epoch, marker)
        self.rank = rank
        self.committed_in = committed_in

    def on_epoch_begin(self, epoch, logs=None):
        import os

        if os.environ["RANK"] != str(self.rank):
            return
        if epoch == self.epoch and self.committed_in is not None and not os.path.exists(self.marker):
            _wait_for_commit(self.committed_in, f"epoch-{epoch:04d}.keras")
        super().on_epoch_begin(epoch, logs)


def _wait_for_commit(checkpoint_dir: str, name: str, timeout_s: float = 120) -> None:
    import os

    from gpu_proxy.storage import list_committed

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []:
            if any(url.endswith(f"/{name}") for url in list_committed(os.path.join(checkpoint_dir, run))):
                return
        time.sleep(0.1)
    raise TimeoutError(f"{name} was not committed under {checkpoint_dir} within {timeout_s:g} s")


class RecordEpochBegins(keras.callbacks.Callback):
    """Runs on the workers: appends '<pid> <epoch>' to <folder>/rank<RANK>.txt as each epoch begins."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def on_epoch_begin(self, epoch, logs=None):
        import os

        with open(os.path.join(self.folder, f"rank{os.environ['RANK']}.txt"), "a") as file:
            file.write(f"{os.getpid()} {epoch}\n")


class RecordCalls(keras.callbacks.Callback):
    """Runs on the workers: counts and records what Keras calls it with, as a user's callback does.
    It also holds things that must never come home by value (a function, the model's optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.train_batches = 0
        self.epochs: list[int] = []
        self.epoch_logs: dict[int, dict[str, float]] = {}
        self.test_batches: list[int] = []
        self.predict_batches: list[int] = []
        self.ended = ""
        self.transform = len  # a function: a reference, kept at home as it is
        self.optimizer_seen = None

    def on_train_begin(self, logs=None):
        self.optimizer_seen = self.model.optimizer

    def on_train_batch_end(self, batch, logs=None):
        self.train_batches += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.epoch_logs[epoch] = dict(logs or {})

    def on_test_batch_end(self, batch, logs=None):
        self.test_batches.append(batch)

    def on_predict_batch_end(self, batch, logs=None):
        self.predict_batches.append(batch)

    def on_train_end(self, logs=None):
        self.ended += "train "

    def on_test_end(self, logs=None):
        self.ended += "test "

    def on_predict_end(self, logs=None):
        self.ended += "predict "


class StopAtEpochEnd(keras.callbacks.Callback):
    """A home callback: stops the fit at the end of `epoch`, as EarlyStopping would."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.stop_training = True
