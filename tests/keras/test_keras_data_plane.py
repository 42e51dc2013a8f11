"""A real-size Keras model on the data plane: ~400 MB of weights out and back, and ~500 MB of arrays out
(the fit; predict then sends an 8 MB model the same way).

The embedded cluster (its shared run folder) and a cluster given by address (staging URL) each
carry one large case; the SSH path is the same code as Lightning's (tests/lightning/test_lightning_on_ssh_cluster.py).
"""
from __future__ import annotations

import hashlib

import keras
import numpy as np
import pytest

from gpu_proxy_keras import RemoteFit

pytestmark = pytest.mark.timeout(600)


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).view(np.uint8))
    return digest.hexdigest()


class Digest(keras.callbacks.Callback):
    """Rank 0's weights digest after training; a plain attribute, so it comes home with the callback."""

    def __init__(self) -> None:
        super().__init__()
        self.digest = ""

    def on_train_end(self, logs=None):
        self.digest = weights_digest(self.model)


def big_model(megabytes: int) -> keras.Model:
    width = int((megabytes * 2**20 / 4) ** 0.5)
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    return model


def _data(width: int, megabytes: float) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((max(8, int(megabytes * 2**20 / 4 / width)), width),
                                                 dtype=np.float32)
    return x, x[:, :1].copy()


def _fit_and_check(remote_fit, megabytes: int, data_megabytes: int) -> None:
    """A large fit, then predict of an 8 MB model: predict sends its model as fit does, so the
    large size is carried by the fit alone (the suite's time)."""
    model = big_model(megabytes)
    x, y = _data(model.input_shape[-1], data_megabytes)
    before, digest = weights_digest(model), Digest()
    history = remote_fit(model).fit(x, y, batch_size=4, epochs=1, steps_per_epoch=2, verbose=0, callbacks=[digest])
    assert len(history.epoch) == 1
    assert digest.digest and digest.digest != before
    assert weights_digest(model) == digest.digest, "home's weights must be rank 0's, bit for bit"
    small = big_model(8)
    x, _ = _data(small.input_shape[-1], 0)
    predictions = remote_fit(small).predict(x, batch_size=4, verbose=0)
    np.testing.assert_allclose(predictions, small.predict(x, batch_size=4, verbose=0), rtol=1e-5, atol=1e-5)


def test_a_400mb_keras_model_and_500mb_of_arrays_on_the_embedded_cluster(local_cluster):
    _fit_and_check(lambda model: RemoteFit(model, cluster=local_cluster), 400, data_megabytes=512)


def test_a_400mb_keras_model_by_address_through_a_staging_url(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    staging = tmp_path / "staging"
    _fit_and_check(lambda model: RemoteFit(model, cluster=ray_head.dashboard_url, staging_dir=f"file://{staging}"),
                   400, data_megabytes=8)
    assert not staging.exists() or list(staging.iterdir()) == []
