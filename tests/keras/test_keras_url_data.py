"""Data given as fsspec URLs to .npy/.npz files: checked at home, read by the workers themselves."""
from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest

from gpu_proxy.errors import ConfigurationError
from gpu_proxy_keras import RemoteFit, data_sources
from tests.keras_project.models import blobs, mlp, two_input_model
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)


def _upload(url, array, storage_options=None):
    with fsspec.open(url, "wb", **(storage_options or {})) as file:
        np.save(file, array)


class CountingFile(io.BytesIO):
    """A file that counts the bytes read from it."""

    def __init__(self, data):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size=-1):
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk


def test_a_rank_reads_only_its_rows_of_a_npy_file():
    array = np.arange(1000 * 64, dtype="float32").reshape(1000, 64)
    buffer = io.BytesIO()
    np.save(buffer, array)
    for rank, rows in ((0, slice(0, 333)), (2, slice(666, 1000))):
        file = CountingFile(buffer.getvalue())
        got = data_sources._read_npy_rows(file, (rank, 3))
        np.testing.assert_array_equal(got, array[rows])
        assert file.bytes_read < 200 + (rows.stop - rows.start) * 64 * 4  # the header and its rows only
    fortran = CountingFile(_npy_bytes(np.asfortranarray(array)))
    np.testing.assert_array_equal(data_sources._read_npy_rows(fortran, (1, 2)), array[500:])


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture
def no_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a run started although the data URL was bad")
    monkeypatch.setattr("gpu_proxy_keras.remote_fit.execute", refuse)
    monkeypatch.setattr("gpu_proxy_keras.remote_fit.resolve_cluster", refuse)


def test_a_missing_file_is_refused_at_home(no_runs, tmp_path):
    x, y = blobs(n=16)
    _upload(str(tmp_path / "y.npy"), y)
    with pytest.raises(ConfigurationError, match=r"x='.*missing\.npy' does not exist"):
        RemoteFit(mlp()).fit(str(tmp_path / "missing.npy"), str(tmp_path / "y.npy"))
    with pytest.raises(ConfigurationError, match=r"validation_data\[1\]=.* does not exist"):
        RemoteFit(mlp()).fit(x, y, validation_data=(x, str(tmp_path / "nope.npy")))


def test_other_file_formats_are_refused_with_the_fix(no_runs, tmp_path):
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ConfigurationError, match=r"\.npy file .* \.npz file .*function that builds"):
        RemoteFit(mlp()).evaluate(str(tmp_path / "x.csv"))


@pytest.mark.usefixtures("local_cluster")
def test_s3_arrays_train_evaluate_and_predict_as_local_arrays(s3_bucket):  # noqa: F811
    options = s3_bucket.endpoint.storage_options
    x, y = blobs(n=96, seed=7)
    _upload(f"{s3_bucket.url}/data/x.npy", x, options)
    _upload(f"{s3_bucket.url}/data/y.npy", y, options)
    x_url, y_url = f"{s3_bucket.url}/data/x.npy", f"{s3_bucket.url}/data/y.npy"

    model, twin = mlp(), mlp()
    remote = RemoteFit(model, num_workers=2, storage_options=options)
    history = remote.fit(x_url, y_url, batch_size=32, epochs=2, shuffle=False, verbose=0,
                         validation_data=(x_url, y_url))
    expected = twin.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0, validation_data=(x, y))
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(history.history[key], expected.history[key], rtol=0, atol=1e-5)

    got = remote.evaluate(x_url, y_url, batch_size=32, verbose=0, return_dict=True)
    expected_metrics = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    assert got == pytest.approx(expected_metrics, abs=1e-5)
    np.testing.assert_allclose(remote.predict(x_url, verbose=0), model.predict(x, verbose=0), rtol=0, atol=1e-6)


@pytest.mark.usefixtures("local_cluster")
def test_a_npz_file_holds_a_multi_input_models_named_inputs(tmp_path):
    rng = np.random.default_rng(2)
    x = {"a": rng.normal(size=(20, 4)).astype("float32"), "b": rng.normal(size=(20, 4)).astype("float32")}
    np.savez(tmp_path / "inputs.npz", **x)
    model = two_input_model()
    got = RemoteFit(model, num_workers=2).predict(f"file://{tmp_path}/inputs.npz", verbose=0)
    np.testing.assert_allclose(got, model.predict(x, verbose=0), rtol=0, atol=1e-6)


def test_sample_counts_come_from_headers_and_urls_are_judged_by_their_path(tmp_path):
    np.savez_compressed(tmp_path / "big.npz", a=np.zeros((300, 5)), b=np.ones((300, 2)))
    assert data_sources.sample_count(str(tmp_path / "big.npz"), None) == 300
    np.save(tmp_path / "scalar.npy", np.float32(3))
    with pytest.raises(ConfigurationError, match="0-d array; data needs a sample axis"):
        data_sources.sample_count(str(tmp_path / "scalar.npy"), None)
    assert data_sources._suffix("https://bucket.example/x.NPY?X-Amz-Signature=abc.csv") == ".npy"
