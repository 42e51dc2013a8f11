"""The per-call fast paths: a pooled worker keeps its last model; batch events only when home uses them."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from gpu_proxy_keras import RemoteFit, model_cache
from gpu_proxy_keras.home_events import HomeEventHandler
from gpu_proxy_keras.remote_fit import _archive
from gpu_proxy_keras.worker_job import _load_model
from tests.keras_project.models import blobs, mlp

FIT = dict(batch_size=32, epochs=2, shuffle=False, verbose=0)


def test_a_kept_model_takes_the_new_archives_weights_and_optimizer_state():
    x, y = blobs(n=64)
    model_cache.forget()
    home = mlp(seed=1)
    first = model_cache.load(_archive(home), {}, lambda a: _load_model(a, {}))
    first.fit(x, y, **FIT)  # the kept copy moves on: its state must not leak into the next run
    home.fit(x, y, epochs=1, verbose=0)  # home's own, different state: nonzero slots and iterations
    archive = _archive(home)
    kept = model_cache.load(archive, {}, lambda a: _load_model(a, {}))
    fresh = _load_model(archive, {})
    assert kept is first
    for mine, theirs in zip(kept.weights + kept.optimizer.variables,
                            fresh.weights + fresh.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    assert kept.fit(x, y, **FIT).history == fresh.fit(x, y, **FIT).history
    model_cache.forget()


def test_a_model_using_a_custom_object_is_rebuilt_every_time():
    archive = _archive(mlp(with_custom_layer=True))
    from tests.keras_project.models import Scale

    custom = {"keras_project>Scale": Scale}
    first = model_cache.load(archive, custom, lambda a: _load_model(a, custom))
    assert model_cache.load(archive, custom, lambda a: _load_model(a, custom)) is not first


@pytest.mark.usefixtures("local_cluster")
@pytest.mark.timeout(120)
def test_repeated_remote_fits_of_one_model_match_local_fits():
    x, y = blobs(n=64)
    local, remote = mlp(seed=3), mlp(seed=3)
    fit = RemoteFit(remote)
    for round_ in range(2):  # the second run reuses the worker's kept model
        if round_:  # home's state moves away from the worker's copy: the run must take home's
            reset = [np.full_like(w, 0.1) for w in local.get_weights()]
            local.set_weights(reset)
            remote.set_weights(reset)
        expected = local.fit(x, y, **FIT).history
        got = fit.fit(x, y, **FIT).history
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-5)
        for mine, theirs in zip(remote.get_weights(), local.get_weights()):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


class BatchCounter(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


def test_batch_events_are_sent_only_when_home_uses_them():
    model = mlp()
    quiet = HomeEventHandler(model, verbose=0, home_callbacks=[keras.callbacks.History()], add_history=True)
    assert not quiet.wants_batches
    assert HomeEventHandler(model, verbose=1, home_callbacks=[], add_history=True).wants_batches
    assert HomeEventHandler(model, verbose=0, home_callbacks=[BatchCounter()], add_history=True).wants_batches


@pytest.mark.usefixtures("local_cluster")
@pytest.mark.timeout(120)
def test_a_home_batch_hook_gets_every_batch_without_a_progress_bar():
    x, y = blobs(n=64)
    counter = BatchCounter()
    RemoteFit(mlp(), home_callbacks=[counter]).fit(x, y, **FIT)  # verbose=0
    assert counter.batches == FIT["epochs"] * 2  # 64 samples, batch 32


class LeavesKerasState(keras.callbacks.Callback):
    """Changes Keras' global configuration and seeds on the worker, after its run trained."""

    def on_train_end(self, logs=None):
        import os

        self.pid = os.getpid()
        keras.config.set_floatx("float16")
        keras.config.set_epsilon(1e-3)
        keras.config.set_image_data_format("channels_first")
        keras.config.set_dtype_policy("mixed_float16")
        keras.config.set_max_epochs(1)
        keras.utils.set_random_seed(0)
        keras.config.enable_unsafe_deserialization()


class SeesKerasState(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        import os

        self.pid = os.getpid()
        self.seen = (keras.config.floatx(), keras.config.epsilon(), keras.config.image_data_format(),
                     keras.config.dtype_policy().name, keras.config.max_epochs())
        self.draw = float(np.random.random())
        from keras.src.utils import rng_utils

        from keras.src.saving import serialization_lib

        self.keras_seed = rng_utils.get_random_seed()  # what Keras, TensorFlow and Python were seeded with
        self.safe_mode = serialization_lib.in_safe_mode()


@pytest.mark.usefixtures("local_cluster")
@pytest.mark.timeout(120)
def test_keras_state_one_run_set_on_a_pooled_worker_is_gone_in_the_next():
    x, y = blobs(n=64)
    model = mlp(seed=4)
    leaves, sees = LeavesKerasState(), SeesKerasState()
    RemoteFit(model).fit(x, y, callbacks=[leaves], **FIT)
    history = RemoteFit(model).fit(x, y, callbacks=[sees], **FIT)
    assert sees.pid == leaves.pid  # the same pooled process served both runs
    assert sees.seen == ("float32", 1e-7, "channels_last", "float32", None)
    assert len(history.epoch) == FIT["epochs"]  # no epoch cap left by the first run
    np.random.seed(0)
    assert sees.draw != np.random.random()  # not the first draw of the seed the last run set
    assert sees.keras_seed is None  # unseeded, as a fresh process (its backend reseeded from entropy)
    assert sees.safe_mode is not False  # the first run's enable_unsafe_deserialization did not outlive it
