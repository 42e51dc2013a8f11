"""What RemoteFit accepts and refuses: data forms, and clear errors at home before anything starts."""
from __future__ import annotations

import threading

import keras
import numpy as np
import pytest

from gpu_proxy.errors import ConfigurationError, ShippingError
from gpu_proxy_keras import RemoteFit, arguments
from tests.keras_project.models import blobs, blobs_dataset, mlp, two_input_model

pytestmark = pytest.mark.timeout(300)


class HoldsALock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def _no_run(*args, **kwargs):
    raise AssertionError("a run started although the arguments were bad")


@pytest.fixture
def no_runs(monkeypatch):
    """Bad arguments must fail before the cluster is even asked for."""
    monkeypatch.setattr("gpu_proxy_keras.remote_fit.execute", _no_run)
    monkeypatch.setattr("gpu_proxy_keras.remote_fit.resolve_cluster", _no_run)


def test_uncompiled_model_is_refused_by_fit(no_runs):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    x, y = blobs(n=16)
    with pytest.raises(ConfigurationError, match="not compiled.*model.compile"):
        RemoteFit(model).fit(x, y)  # predict needs no compile: tests/keras/test_keras_parity.py


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "epochs=0"),
    (dict(epochs=2, initial_epoch=5), "initial_epoch=5"),
    (dict(validation_split=1.5), "validation_split=1.5"),
])
def test_bad_fit_arguments_are_refused(no_runs, bad, message):
    x, y = blobs(n=16)
    with pytest.raises(ConfigurationError, match=message):
        RemoteFit(mlp()).fit(x, y, **bad)


def test_a_dataset_object_is_refused_with_the_fix(no_runs):
    with pytest.raises(ConfigurationError, match="Pass the function that builds it"):
        RemoteFit(mlp()).fit(blobs_dataset())


def test_a_generator_is_refused(no_runs):
    x, y = blobs(n=16)
    with pytest.raises(ConfigurationError, match="x is a generator"):
        RemoteFit(mlp()).fit((pair for pair in zip(x, y)))


def test_validation_split_needs_arrays(no_runs):
    with pytest.raises(ConfigurationError, match="validation_split needs array data"):
        RemoteFit(mlp()).fit(blobs_dataset, validation_split=0.2)


def test_backup_and_restore_is_refused_with_several_workers(no_runs, tmp_path):
    x, y = blobs(n=16)
    with pytest.raises(ConfigurationError, match="BackupAndRestore"):
        RemoteFit(mlp(), num_workers=2).fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path))])


def test_several_workers_need_the_tensorflow_backend():
    with pytest.raises(ConfigurationError, match="'torch' Keras backend"):
        arguments.check_workers(2, "torch")
    with pytest.raises(ConfigurationError, match="num_workers=0"):
        arguments.check_workers(0, "tensorflow")


def test_an_unpicklable_callback_is_named_before_any_worker_starts(no_runs):
    x, y = blobs(n=16)
    with pytest.raises(ShippingError, match="lock"):
        RemoteFit(mlp()).fit(x, y, callbacks=[HoldsALock()])


@pytest.mark.usefixtures("local_cluster")
def test_dict_inputs_and_a_dataset_building_function_train_remotely():
    rng = np.random.default_rng(3)
    x = {"a": rng.normal(size=(64, 4)).astype("float32"), "b": rng.normal(size=(64, 4)).astype("float32")}
    y = rng.integers(0, 3, size=64).astype("int32")
    model, twin = two_input_model(), two_input_model()
    history = RemoteFit(model).fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    expected = twin.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=0, atol=1e-5)

    model = mlp()
    history = RemoteFit(model).fit(blobs_dataset, epochs=2, validation_data=blobs_dataset, verbose=0)
    assert history.params["steps"] == 3 and len(history.history["val_loss"]) == 2
