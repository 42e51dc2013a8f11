"""RemoteFit with one worker on the embedded cluster: it behaves as Keras' own fit/evaluate/predict."""
from __future__ import annotations

import contextlib
import io
import time

import keras
import numpy as np
import pytest

from gpu_proxy_keras import RemoteFit
from tests.keras_project.callbacks import EpochClock, FailAtEpoch, SlowEpochs
from tests.keras_project.models import Scale, blobs, mlp

pytestmark = [pytest.mark.usefixtures("local_cluster"), pytest.mark.timeout(300)]

FIT = dict(batch_size=32, epochs=3, validation_split=0.25, shuffle=False)


@pytest.fixture(scope="module")
def fitted():
    x, y = blobs(n=128)
    local_twin = mlp(with_custom_layer=True)
    local_history = local_twin.fit(x, y, verbose=0, **FIT)
    model = mlp(with_custom_layer=True)
    clock = EpochClock()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        history = RemoteFit(model, home_callbacks=[clock]).fit(
            x, y, verbose=1, callbacks=[SlowEpochs(0.5)], **FIT)
        finished = time.monotonic()
    return dict(x=x, y=y, model=model, history=history, twin=local_twin, twin_history=local_history,
                clock=clock, finished=finished, printed=printed.getvalue())


def test_fit_returns_a_real_history_of_the_local_model(fitted):
    history, model = fitted["history"], fitted["model"]
    assert isinstance(history, keras.callbacks.History)
    assert history.model is model and model.history is history
    assert history.epoch == [0, 1, 2]
    assert history.params == {"verbose": 1, "epochs": 3, "steps": 3}
    expected = fitted["twin_history"].history
    assert set(history.history) == set(expected) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in expected.items():
        assert len(history.history[key]) == 3
        np.testing.assert_allclose(history.history[key], values, rtol=0, atol=1e-5, err_msg=key)


def test_local_model_holds_trained_weights_and_optimizer_state(fitted):
    model, twin = fitted["model"], fitted["twin"]
    for remote_weight, local_weight in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(remote_weight, local_weight, rtol=0, atol=1e-5)
    assert int(model.optimizer.iterations.numpy()) == 9  # 3 epochs x 3 steps
    for remote_var, local_var in zip(model.optimizer.variables, twin.optimizer.variables):
        np.testing.assert_allclose(np.array(remote_var), np.array(local_var), rtol=0, atol=1e-5)
    scale = next(layer for layer in model.layers if isinstance(layer, Scale))
    assert float(scale.factor.numpy()) != 1.0  # the project's custom layer trained remotely


def test_progress_bar_renders_at_home_only(fitted):
    printed = fitted["printed"]
    for epoch in (1, 2, 3):
        assert printed.count(f"Epoch {epoch}/3") == 1, printed
    assert "val_accuracy" in printed
    assert "(rank 0) Epoch" not in printed and "step - " not in "".join(
        line for line in printed.splitlines() if line.startswith("(rank"))


def test_home_callbacks_get_every_epoch_live_with_remote_params(fitted):
    clock, history = fitted["clock"], fitted["history"]
    assert [epoch for epoch, _, _ in clock.arrivals] == [0, 1, 2]
    assert clock.params_seen["epochs"] == 3 and clock.params_seen["steps"] == 3
    assert clock.model_seen is fitted["model"]
    for epoch, _, logs in clock.arrivals:
        assert logs["loss"] == pytest.approx(history.history["loss"][epoch], abs=1e-6)
    # Each epoch lasts >= 0.5 s on the worker: epoch 0 arrived while epochs 1 and 2 still ran.
    assert fitted["finished"] - clock.arrivals[0][1] > 0.8


def test_evaluate_and_predict_return_what_keras_returns(fitted):
    model, x, y = fitted["model"], fitted["x"], fitted["y"]
    remote = RemoteFit(model)
    assert remote.evaluate(x, y, verbose=0) == pytest.approx(model.evaluate(x, y, verbose=0), abs=1e-6)
    as_dict = remote.evaluate(x, y, verbose=0, return_dict=True)
    assert set(as_dict) == {"loss", "accuracy"}
    predictions = remote.predict(x, batch_size=50, verbose=0)
    assert isinstance(predictions, np.ndarray) and predictions.shape == (128, 3)
    np.testing.assert_allclose(predictions, model.predict(x, verbose=0), rtol=0, atol=1e-6)


def test_a_second_fit_continues_from_the_trained_state():
    x, y = blobs(n=64)
    model, twin = mlp(), mlp()
    remote = RemoteFit(model)
    for _ in range(2):
        remote.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        twin.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4
    for remote_weight, local_weight in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(remote_weight, local_weight, rtol=0, atol=1e-5)


def test_early_stopping_runs_on_the_worker():
    x, y = blobs(n=64)
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="sparse_categorical_crossentropy")
    history = RemoteFit(model).fit(x, y, batch_size=32, epochs=10, shuffle=False, verbose=0,
                                   callbacks=[keras.callbacks.EarlyStopping(monitor="loss", patience=1)])
    assert len(history.history["loss"]) == 2  # no improvement: stops at patience + 1 epochs
    assert history.epoch == [0, 1]


def test_a_worker_exception_is_raised_at_home_with_its_remote_traceback():
    x, y = blobs(n=32)
    with pytest.raises(ValueError, match="deliberate failure at epoch 1") as raised:
        RemoteFit(mlp()).fit(x, y, epochs=3, verbose=0, callbacks=[FailAtEpoch(1)])
    assert "Remote traceback" in str(raised.value)
