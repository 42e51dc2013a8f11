"""After RemoteFit's fit/evaluate/predict, the local objects hold what a local call leaves in them:
the callbacks' state, metric and counter variables; inputs and uncompiled models as Keras takes them."""
from __future__ import annotations

import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from gpu_proxy.errors import ConfigurationError
from gpu_proxy_keras import RemoteFit, native_data
from tests.keras_project.callbacks import RecordCalls
from tests.keras_project.models import blobs, counting_mlp, mlp
from tests.keras.test_keras_inputs import no_runs  # noqa: F401  (bad arguments fail before any run starts)

pytestmark = [pytest.mark.usefixtures("local_cluster"), pytest.mark.timeout(300)]


def _fit_callbacks():
    return [keras.callbacks.EarlyStopping(monitor="loss", patience=1, restore_best_weights=True),
            keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5),
            RecordCalls()]


# ----- 1. callback state comes home ----------------------------------------------------------
def test_fit_callbacks_hold_rank_zeros_state_after_fit():
    x, y = blobs(n=64)
    model, twin = mlp(), mlp()
    for m in (model, twin):  # no progress: EarlyStopping stops after patience + 1 epochs
        m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="sparse_categorical_crossentropy")
    remote, local = _fit_callbacks(), _fit_callbacks()
    RemoteFit(model).fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0, callbacks=remote)
    twin.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0, callbacks=local)

    stop, plateau, record = remote
    assert stop.stopped_epoch == local[0].stopped_epoch == 1
    for name in ("wait", "best_epoch", "stopped_epoch"):
        assert getattr(stop, name) == getattr(local[0], name), name
    assert stop.best == pytest.approx(local[0].best, abs=1e-6)
    assert len(stop.best_weights) == len(local[0].best_weights) == 4
    for got, expected in zip(stop.best_weights, local[0].best_weights):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert (plateau.wait, plateau.cooldown_counter) == (local[1].wait, local[1].cooldown_counter)
    assert plateau.best == pytest.approx(local[1].best, abs=1e-6)
    assert record.train_batches == local[2].train_batches == 8  # 2 epochs x 4 batches
    assert record.epochs == local[2].epochs == [0, 1]
    assert record.epoch_logs.keys() == local[2].epoch_logs.keys()
    assert record.epoch_logs[1]["loss"] == pytest.approx(local[2].epoch_logs[1]["loss"], abs=1e-5)
    assert record.ended == "train "
    # References stay home's own: the local model attached as Keras leaves it, never a worker's.
    assert all(callback.model is model for callback in remote)
    assert record.transform is len and record.optimizer_seen is None
    assert stop.params == {"verbose": 0, "epochs": 10, "steps": 4}


def test_evaluate_and_predict_callbacks_hold_their_state():
    x, y = blobs(n=40)
    model = mlp()
    record, twin_record = RecordCalls(), RecordCalls()
    remote = RemoteFit(model)
    remote.evaluate(x, y, batch_size=16, verbose=0, callbacks=[record])
    remote.predict(x, batch_size=8, verbose=0, callbacks=[record])
    model.evaluate(x, y, batch_size=16, verbose=0, callbacks=[twin_record])
    model.predict(x, batch_size=8, verbose=0, callbacks=[twin_record])
    assert record.test_batches == twin_record.test_batches == [0, 1, 2]
    assert record.predict_batches == twin_record.predict_batches == [0, 1, 2, 3, 4]
    assert record.ended == "test predict "


# ----- 2. backend-native tensors as input ----------------------------------------------------
@pytest.mark.timeout(600)
def test_two_workers_fit_on_tf_tensors_as_on_numpy():
    x, y = blobs(n=64)
    fit = dict(batch_size=32, epochs=2, shuffle=False, verbose=0)
    on_numpy, on_tensors = mlp(), mlp()
    expected = RemoteFit(on_numpy, num_workers=2).fit(x, y, **fit)
    got = RemoteFit(on_tensors, num_workers=2).fit(
        tf.constant(x), keras.ops.convert_to_tensor(y), validation_data=(tf.constant(x[:16]), y[:16]), **fit)
    np.testing.assert_allclose(got.history["loss"], expected.history["loss"], rtol=0, atol=1e-6)
    for a, b in zip(on_tensors.get_weights(), on_numpy.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_sparse_tensors_are_refused_at_home_naming_the_type(no_runs):
    x, y = blobs(n=16)
    sparse = tf.sparse.from_dense(x)
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=r"x is a tensorflow SparseTensor.*tf.sparse.to_dense"):
        RemoteFit(mlp(), num_workers=2).fit(sparse, y)
    with pytest.raises(ConfigurationError, match=r"x\[0\] is a tensorflow RaggedTensor"):
        RemoteFit(mlp()).predict([tf.ragged.constant([[1.0], [2.0, 3.0]])])
    assert time.monotonic() - started < 5


def test_every_dense_tensor_kind_becomes_numpy_at_home():
    import jax.numpy as jnp
    import pandas as pd
    import torch

    x = np.arange(6, dtype="float32").reshape(3, 2)
    converted = native_data.to_numpy("x", {"tf": tf.constant(x), "ops": keras.ops.ones((3, 2)),
                                           "jax": jnp.asarray(x), "torch": torch.from_numpy(x),
                                           "frame": pd.DataFrame(x), "list": [tf.constant(x)],
                                           "numpy": x})
    for key, value in converted.items():
        value = value[0] if key == "list" else value
        assert type(value) is np.ndarray and value.shape == (3, 2), key
    np.testing.assert_array_equal(converted["torch"], x)
    assert converted["numpy"] is x
    with pytest.raises(ConfigurationError, match="torch Tensor"):
        native_data.to_numpy("y", torch.eye(3).to_sparse())


# ----- 3. uncompiled models ------------------------------------------------------------------
def test_an_uncompiled_model_predicts_as_locally():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    x, _ = blobs(n=20)
    got = RemoteFit(model).predict(x, verbose=0)
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=0, atol=1e-6)


def test_an_uncompiled_model_is_refused_by_fit_and_evaluate_as_by_keras(no_runs):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    x, y = blobs(n=16)
    with pytest.raises(ValueError, match="compile"):
        model.evaluate(x, y, verbose=0)  # what Keras itself does
    remote = RemoteFit(model)
    with pytest.raises(ConfigurationError, match=r"not compiled.*RemoteFit\(...\)\.fit"):
        remote.fit(x, y)
    with pytest.raises(ConfigurationError, match=r"not compiled.*RemoteFit\(...\)\.evaluate"):
        remote.evaluate(x, y)


# ----- 4. state changed by evaluate/predict lands in the local model -------------------------
def test_counters_updated_in_predict_and_test_steps_land_locally():
    x, y = blobs(n=40)
    model, twin = counting_mlp(), counting_mlp()
    remote = RemoteFit(model)
    remote.predict(x, batch_size=16, verbose=0)
    remote.evaluate(x, y, batch_size=8, verbose=0)
    twin.predict(x, batch_size=16, verbose=0)
    twin.evaluate(x, y, batch_size=8, verbose=0)
    assert float(model.predicted_batches.numpy()) == float(twin.predicted_batches.numpy()) == 3
    assert float(model.tested_batches.numpy()) == float(twin.tested_batches.numpy()) == 5


@pytest.mark.parametrize("workers", [1, 2])
def test_metric_state_after_evaluate_is_the_evaluations(workers):
    x, y = blobs(n=41, seed=2)
    model, twin = mlp(), mlp()  # compiled, metrics never run here: home must build them
    got = RemoteFit(model, num_workers=workers).evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    expected = twin.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    local_result = {key: float(value) for key, value in model.get_metrics_result().items()}
    assert local_result.keys() == expected.keys() == {"loss", "accuracy"}
    for key in expected:
        assert local_result[key] == pytest.approx(expected[key], abs=1e-5), key
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    for variable, twin_variable in zip(model.metrics_variables, twin.metrics_variables):
        assert variable.path == twin_variable.path
        np.testing.assert_allclose(np.asarray(variable), np.asarray(twin_variable), rtol=0, atol=1e-4)
