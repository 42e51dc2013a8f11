"""A tiny Ray Tune trainable whose trials are remote Keras fits (tests/keras/test_ray_tune_keras.py).

The blobs MLP of the Keras tests, no shuffling, so a fit is the same wherever it runs. Each trial notes
in ``<folder>/<trial id>.jsonl``: the trainable's placement group and the epoch it starts at
(``trainable``), and after its fit the History it got (``history``); from rank 0, the worker's
process and placement group (``worker``) and each epoch's logs (``epoch``); and the weights at each
epoch end (``<trial id>-epoch<N>.npz``), after the fit (``-fit.npz``) and after a restore
(``-restored.npz``). ``fail_once``: the first attempt raises at the start of epoch 1, after epoch 0's
report; Tune restores the trial from that checkpoint (and the trainable then leaves a ``restored``
file). ``after_restore``: rank 0 reports epoch 0 only once that file is there, so that ASHA compares
it with the other trial's first report. ``epoch_s`` makes each epoch last a while.
Lightning is never imported here: a trial's processes import Keras (TensorFlow) only.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import keras
import numpy as np
import ray
from ray import tune
from ray.util.placement_group import get_current_placement_group, placement_group_table

from gpu_proxy_keras import RemoteFit
from gpu_proxy_keras.tune import TuneReportCallback, restore_checkpoint, trial_resources
from tests.keras_project.models import blobs, mlp

MAX_EPOCHS = 4
BATCH_SIZE = 16
STEPS_PER_EPOCH = 4  # 64 samples
CPUS_PER_WORKER = 0.5
CASES = [  # both at once
    {"lr": 0.05, "fail_once": True},  # fails in epoch 1, is restored from epoch 0's checkpoint, ends at MAX_EPOCHS
    {"lr": 1e-5, "epoch_s": 1.0, "after_restore": True},  # far worse at epoch 0: ASHA stops it there, mid-run
]
RESTORED = "restored"  # the file a restored trainable leaves in the folder


def note(folder: str, trial: str, **entry) -> None:
    with open(Path(folder) / f"{trial}.jsonl", "a") as out:
        out.write(json.dumps(dict(entry, t=time.time())) + "\n")


def save_weights(folder: str, name: str, model: keras.Model) -> None:
    np.savez(Path(folder) / f"{name}.npz", *model.get_weights())


def model_for(lr: float) -> keras.Model:
    model = mlp(seed=1)  # every trial starts from the same weights
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
    return model


class Notes(keras.callbacks.Callback):
    """Runs on the workers (rank 0 notes): what the trial's run did, epoch by epoch."""

    def __init__(self, folder: str, trial: str, fail: bool, epoch_s: float, after_restore: bool) -> None:
        super().__init__()
        self.folder, self.trial, self.fail, self.epoch_s = folder, trial, fail, epoch_s
        self.after_restore = after_restore

    def on_train_begin(self, logs=None):
        note(self.folder, self.trial, kind="worker", pid=os.getpid(),
             pg=ray.get_runtime_context().get_placement_group_id())

    def on_epoch_begin(self, epoch, logs=None):
        if self.fail and epoch == 1:
            raise RuntimeError("this trial fails on purpose")

    def on_epoch_end(self, epoch, logs=None):
        note(self.folder, self.trial, kind="epoch", epoch=epoch, logs={k: float(v) for k, v in logs.items()})
        save_weights(self.folder, f"{self.trial}-epoch{epoch}", self.model)
        time.sleep(self.epoch_s)
        deadline = time.monotonic() + 120
        while self.after_restore and not (Path(self.folder) / RESTORED).exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # before this epoch goes home (the next callbacks save and send it)


def train(config: dict) -> None:
    folder, trial = config["folder"], tune.get_context().get_trial_id()
    note(folder, trial, kind="start")
    model = model_for(config["lr"])
    initial_epoch = restore_checkpoint(model)  # 0 unless Tune restores this trial
    pg = get_current_placement_group()
    note(folder, trial, kind="trainable", pg=pg.id.hex(), bundles=placement_group_table(pg)["bundles"],
         initial_epoch=initial_epoch)
    if initial_epoch:
        save_weights(folder, f"{trial}-restored", model)
        (Path(folder) / RESTORED).touch()
    remote = RemoteFit(model, num_workers=1, resources_per_worker={"CPU": CPUS_PER_WORKER},
                       home_callbacks=[TuneReportCallback(metrics=["loss", "val_loss"])])
    x, y = blobs(n=96)  # 64 to train on, 32 to validate
    history = remote.fit(x[:64], y[:64], validation_data=(x[64:], y[64:]), batch_size=BATCH_SIZE, epochs=MAX_EPOCHS,
                         initial_epoch=initial_epoch, shuffle=False, verbose=0,
                         callbacks=[Notes(folder, trial, config["fail_once"] and not initial_epoch,
                                          config["epoch_s"], config["after_restore"])])
    note(folder, trial, kind="history", history=history.history, epoch=history.epoch,
         iterations=int(model.optimizer.iterations.numpy()))
    save_weights(folder, f"{trial}-fit", model)


CASE_DEFAULTS = {"lr": None, "fail_once": False, "epoch_s": 0.0, "after_restore": False}


def from_case(cases: list[dict], key: str, default: object) -> object:
    """``key`` of the trial's case, which Tune resolves per trial from the grid's ``case``."""
    return tune.sample_from(lambda config: cases[config["case"]].get(key, default))


def tuner(folder: str, storage: str, cases: list[dict] = CASES) -> tune.Tuner:
    from ray.tune.schedulers import ASHAScheduler

    return tune.Tuner(
        tune.with_resources(train, trial_resources(num_workers=1, cpus_per_worker=CPUS_PER_WORKER,
                                                   trainable_cpus=0.5)),
        param_space={"case": tune.grid_search(list(range(len(cases)))), "folder": folder,
                     **{key: from_case(cases, key, default) for key, default in CASE_DEFAULTS.items()}},
        # Rungs at iterations 1 and 4 (reduction_factor=4), and max_t after the fit's last epoch: at its
        # own end a trial is not stopped by Tune, and its fit returns a History.
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", max_concurrent_trials=2,
                                    scheduler=ASHAScheduler(max_t=2 * MAX_EPOCHS, grace_period=1, reduction_factor=4)),
        run_config=tune.RunConfig(name="tune-keras-test", storage_path=storage, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
