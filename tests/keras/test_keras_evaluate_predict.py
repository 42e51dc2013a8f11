"""evaluate/predict on several workers: each rank takes its shard, the result is one worker's over all."""
from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import ray

from gpu_proxy_keras import RemoteFit, data_sources
from tests.keras_project.models import BlobBatches, blob_batches, blobs, mlp, two_input_model

pytestmark = [pytest.mark.usefixtures("local_cluster"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def trained():
    """A model a little trained, so predictions and metrics are not those of the initial weights."""
    x, y = blobs(n=101, seed=5)  # 101 samples: shards of 50 and 51, batches of 16 end short
    model = mlp()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    return model, x, y


def test_two_workers_evaluate_as_one_worker_over_all_samples(trained):
    model, x, y = trained
    weights = np.linspace(0.2, 2.0, len(x)).astype("float32")  # shards differ in weight, not only size
    remote = RemoteFit(model, num_workers=2)
    expected = model.evaluate(x, y, batch_size=16, sample_weight=weights, verbose=0, return_dict=True)
    got = remote.evaluate(x, y, batch_size=16, sample_weight=weights, verbose=0, return_dict=True)
    assert set(got) == set(expected) == {"loss", "accuracy"}
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    # A mean of the two shards' means is not the answer: the shards' own figures differ from it.
    halves = [model.evaluate(x[s], y[s], batch_size=16, sample_weight=weights[s], verbose=0, return_dict=True)
              for s in (slice(0, 50), slice(50, None))]
    assert abs((halves[0]["loss"] + halves[1]["loss"]) / 2 - expected["loss"]) > 1e-4
    as_list = remote.evaluate(x, y, batch_size=16, verbose=0)
    assert as_list == pytest.approx(model.evaluate(x, y, batch_size=16, verbose=0), abs=1e-5)


def test_two_workers_predict_in_input_order(trained):
    model, x, _ = trained
    got = RemoteFit(model, num_workers=2).predict(x, batch_size=16, verbose=0)
    assert isinstance(got, np.ndarray) and got.shape == (101, 3)
    np.testing.assert_allclose(got, model.predict(x, batch_size=16, verbose=0), rtol=0, atol=1e-6)


def test_dict_inputs_are_sharded_together():
    rng = np.random.default_rng(4)
    x = {"a": rng.normal(size=(30, 4)).astype("float32"), "b": rng.normal(size=(30, 4)).astype("float32")}
    model = two_input_model()
    got = RemoteFit(model, num_workers=2).predict(x, verbose=0)
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=0, atol=1e-6)


def test_a_py_dataset_built_on_the_workers_is_sharded_by_batches(trained):
    model, _, _ = trained
    expected = model.evaluate(BlobBatches(), verbose=0, return_dict=True)
    got = RemoteFit(model, num_workers=2).evaluate(blob_batches, verbose=0, return_dict=True)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    # predict keeps the input order, so a function's dataset runs on one worker.
    predictions = RemoteFit(model, num_workers=2).predict(blob_batches, verbose=0)
    np.testing.assert_allclose(predictions, model.predict(BlobBatches(), verbose=0), rtol=0, atol=1e-6)


def test_fewer_samples_than_workers_use_fewer_workers(trained):
    model, x, y = trained
    got = RemoteFit(model, num_workers=2).predict(x[:1], verbose=0)
    np.testing.assert_allclose(got, model.predict(x[:1], verbose=0), rtol=0, atol=1e-6)


def test_a_py_dataset_trains_remotely_as_locally():
    model, twin = mlp(), mlp()
    history = RemoteFit(model).fit(blob_batches, epochs=2, verbose=0, shuffle=False)
    expected = twin.fit(BlobBatches(), epochs=2, verbose=0, shuffle=False)
    np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(model.get_weights()[0], twin.get_weights()[0], rtol=0, atol=1e-5)


class ObjectStoreUsage(keras.callbacks.Callback):
    """Runs at home while the run goes on: what Ray's object store holds then, in MiB."""

    def on_test_begin(self, logs=None):
        from ray._private.internal_api import memory_summary  # Ray's own `ray memory --stats-only`

        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        self.mib = int(re.search(r"Plasma memory usage (\d+) MiB", summary).group(1))


def test_arrays_ship_once_for_all_workers():
    x = np.random.default_rng(0).normal(size=(65536, 64)).astype("float32")  # 16 MiB
    y = np.zeros(len(x), "int32")
    usage = ObjectStoreUsage()
    model = mlp(features=64)
    RemoteFit(model, num_workers=2, home_callbacks=[usage]).evaluate(x, y, batch_size=8192, verbose=0)
    # The arrays travel once, as the run's payload file that both workers map (gpu_proxy.dataplane):
    # not one copy per worker, and nothing bulky in the object store.
    assert usage.mib < 8


def test_shard_bounds_cover_every_sample_once_in_order():
    for count in (1, 7, 100, 101):
        for world_size in (1, 2, 3, 8):
            spans = [data_sources.bounds(count, (rank, world_size)) for rank in range(world_size)]
            assert spans[0][0] == 0 and spans[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


def test_concatenate_joins_every_output_structure():
    parts = [{"p": np.ones((2, 3)), "q": [np.zeros(2), np.ones(2)]},
             {"p": np.zeros((1, 3)), "q": [np.ones(1), np.zeros(1)]}]
    joined = data_sources.concatenate(parts)
    assert joined["p"].shape == (3, 3) and [q.tolist() for q in joined["q"]] == [[0, 0, 1], [1, 1, 0]]


def test_a_dataset_with_fewer_batches_than_workers_is_refused_with_the_fix():
    shard = data_sources.materialise(lambda: BlobBatches(n=100, batch_size=16), None, (1, 2))
    assert len(shard) == 4 and np.array_equal(shard[0][0], BlobBatches()[3][0])  # batches 3 to 6
    with pytest.raises(ValueError, match="1 batches, fewer than the 2 workers.*num_workers=1"):
        data_sources.materialise(lambda: BlobBatches(n=16, batch_size=16), None, (1, 2))


def test_a_py_dataset_object_predicts_in_input_order_on_two_workers(trained):
    model, _, _ = trained
    got = RemoteFit(model, num_workers=2).predict(BlobBatches(), verbose=0)
    np.testing.assert_allclose(got, model.predict(BlobBatches(), verbose=0), rtol=0, atol=1e-6)
