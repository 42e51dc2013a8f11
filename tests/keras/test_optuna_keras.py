"""An Optuna study whose trials are remote Keras fits (``RemoteFit``), pruned and stopped from home.

optuna_integration's ``KerasPruningCallback`` and Keras' ``EarlyStopping`` run at home as
``RemoteFit(home_callbacks=[...])``: the first raises ``optuna.TrialPruned``, the second sets
``model.stop_training``; either stops the remote fit at its next epoch end (docs/sweeps.md).
"""
from __future__ import annotations

import keras
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from optuna_integration import KerasPruningCallback

from gpu_proxy.runs.pool import current_pool
from gpu_proxy.sweeps import optimize
from gpu_proxy_keras import RemoteFit
from tests.keras_project.callbacks import SlowEpochs
from tests.keras_project.models import blobs, mlp

pytestmark = [pytest.mark.timeout(300)]
optuna.logging.set_verbosity(optuna.logging.WARNING)

EPOCHS = 8
FIT = dict(batch_size=16, epochs=EPOCHS, shuffle=False, verbose=0)
STEPS_PER_EPOCH = 4  # 64 samples in batches of 16
PRUNE_ABOVE = 1.5  # the loss of epoch 0: 0.66 at lr=0.05, 2.2 at lr=1e-5 (blobs(n=64), mlp(seed=1))


def _model(lr: float) -> keras.Model:
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
    return model


def test_a_keras_study_prunes_a_trial_mid_run_and_early_stopping_at_home_ends_a_fit(local_cluster):
    x, y = blobs(n=64)
    fits: dict[int, tuple[keras.Model, keras.callbacks.EarlyStopping]] = {}

    def objective(trial: optuna.Trial) -> float:
        model = _model(trial.suggest_float("lr", 1e-5, 0.1, log=True))
        # Stops once the loss fell by less than 10 in an epoch: after epoch 1, whatever the rate.
        early = keras.callbacks.EarlyStopping(monitor="loss", min_delta=10.0, patience=1)
        fits[trial.number] = model, early
        remote = RemoteFit(model, cluster=local_cluster, home_callbacks=[KerasPruningCallback(trial, "loss"), early])
        history = remote.fit(x, y, callbacks=[SlowEpochs(0.3)], **FIT)
        return history.history["loss"][-1]

    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=PRUNE_ABOVE))
    study.enqueue_trial({"lr": 0.05})
    study.enqueue_trial({"lr": 1e-5})
    optimize(study, objective, n_trials=2)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert [group for group in current_pool().describe() if group["state"] == "busy"] == []

    stopped, early = fits[0]  # EarlyStopping at home stopped it after epoch 1 (as locally): fit returned
    assert early.stopped_epoch == 1 and 2 < len(stopped.history.epoch) < EPOCHS  # at the workers' next epoch end
    assert study.trials[0].value == stopped.history.history["loss"][-1]
    _check_trained_so_far(stopped, 0.05)

    pruned, _ = fits[1]  # reported epoch 0 at home, pruned there; the run ended at its next epoch end
    assert list(study.trials[1].intermediate_values) == [0]
    assert study.trials[1].intermediate_values[0] > PRUNE_ABOVE > study.trials[0].intermediate_values[0]
    assert 1 < len(pruned.history.epoch) < EPOCHS
    _check_trained_so_far(pruned, 1e-5)


def _check_trained_so_far(model: keras.Model, lr: float) -> None:
    """The local model holds the state of the epoch where the remote fit ended: a local twin's."""
    epochs = len(model.history.epoch)
    assert int(model.optimizer.iterations.numpy()) == STEPS_PER_EPOCH * epochs
    twin = _model(lr)
    twin.fit(*blobs(n=64), **dict(FIT, epochs=epochs))
    for got, expected in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
