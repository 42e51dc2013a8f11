"""RemoteFit's per-epoch checkpoints (any fsspec URL) and its restarts after a lost worker."""
from __future__ import annotations

import fsspec
import keras
import numpy as np
import pytest

from gpu_proxy import WorkerLostError
from gpu_proxy.errors import ConfigurationError
from gpu_proxy.storage import StorageError, committed_details, list_committed
from gpu_proxy_keras import RemoteFit
from tests.keras_project.callbacks import KillOnceAtEpoch, MarkTrainBegin
from tests.keras_project.models import blobs, mlp
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401

pytestmark = [pytest.mark.usefixtures("local_cluster"), pytest.mark.timeout(300)]

FIT = dict(batch_size=32, shuffle=False)  # 64 samples: 2 steps per epoch


def names(run_url, storage_options=None):
    return [url.rsplit("/", 1)[1] for url in list_committed(run_url, storage_options)]


def assert_close(actual, expected, atol=1e-5):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(np.array(a), np.array(e), rtol=0, atol=atol)


def test_file_checkpoints_one_per_epoch_loadable_at_home(tmp_path):
    x, y = blobs(n=64)
    model = mlp()
    remote = RemoteFit(model, checkpoint_dir=f"file://{tmp_path}/ckpts")
    history = remote.fit(x, y, epochs=3, verbose=0, **FIT)
    assert remote.run_url.startswith(f"file://{tmp_path}/ckpts/")
    assert names(remote.run_url) == ["epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras"]
    details = committed_details(remote.run_url)
    assert [d.meta["epoch"] for d in details] == [0, 1, 2]
    assert details[-1].meta["history"] == history.history and details[-1].meta["epochs"] == [0, 1, 2]
    last = keras.saving.load_model(list_committed(remote.run_url)[-1].removeprefix("file://"))
    assert_close(last.get_weights(), model.get_weights())
    assert_close(last.optimizer.variables, model.optimizer.variables)
    first = keras.saving.load_model(f"{remote.run_url.removeprefix('file://')}/epoch-0001.keras")
    assert int(first.optimizer.iterations.numpy()) == 2  # epoch 1's state, not a later one
    # A second fit of the same RemoteFit is a new run with its own folder.
    remote.fit(x, y, epochs=1, verbose=0, **FIT)
    assert len(list((tmp_path / "ckpts").iterdir())) == 2


def test_s3_checkpoints_one_per_epoch_loadable_at_home(s3_bucket, tmp_path):  # noqa: F811
    x, y = blobs(n=64)
    model = mlp()
    options = s3_bucket.endpoint.storage_options
    remote = RemoteFit(model, checkpoint_dir=f"{s3_bucket.url}/keras", storage_options=options)
    remote.fit(x, y, epochs=2, verbose=0, **FIT)
    urls = list_committed(remote.run_url, options)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["epoch-0001.keras", "epoch-0002.keras"]
    fs = fsspec.filesystem("s3", **options)
    fs.get(urls[-1], str(tmp_path / "last.keras"))
    last = keras.saving.load_model(str(tmp_path / "last.keras"))
    assert_close(last.get_weights(), model.get_weights())


def test_bad_checkpoint_dir_fails_before_any_worker_starts(tmp_path):
    x, y = blobs(n=64)
    started = tmp_path / "started"
    with pytest.raises(StorageError, match="s4://"):
        RemoteFit(mlp(), checkpoint_dir="s4://bucket/runs").fit(
            x, y, epochs=1, verbose=0, callbacks=[MarkTrainBegin(str(started))], **FIT)
    assert not started.exists()
    with pytest.raises(ConfigurationError, match="max_failures=1 needs checkpoint_dir"):
        RemoteFit(mlp(), max_failures=1)


def test_killed_worker_restarts_from_the_last_committed_epoch(tmp_path):
    x, y = blobs(n=64)
    twin = mlp()
    twin_history = twin.fit(x, y, epochs=4, verbose=0, **FIT)
    model = mlp()
    marker = tmp_path / "killed"
    remote = RemoteFit(model, checkpoint_dir=str(tmp_path / "ckpts"), max_failures=1)
    history = remote.fit(x, y, epochs=4, verbose=0, callbacks=[KillOnceAtEpoch(2, str(marker))], **FIT)
    assert len(marker.read_text().split()) == 1  # killed once, at epoch 3's start
    assert history.epoch == [0, 1, 2, 3] and history.model is model and model.history is history
    assert set(history.history) == set(twin_history.history)
    for key, values in twin_history.history.items():
        np.testing.assert_allclose(history.history[key], values, rtol=0, atol=1e-5, err_msg=key)
    # Resumed with the committed optimizer state: the same weights as an unbroken run.
    assert int(model.optimizer.iterations.numpy()) == 8
    assert_close(model.get_weights(), twin.get_weights())
    assert names(remote.run_url) == [f"epoch-000{i}.keras" for i in (1, 2, 3, 4)]


def test_without_max_failures_a_killed_worker_fails_the_run(tmp_path):
    x, y = blobs(n=64)
    with pytest.raises(WorkerLostError, match="died"):
        RemoteFit(mlp(), checkpoint_dir=str(tmp_path / "ckpts")).fit(
            x, y, epochs=3, verbose=0, callbacks=[KillOnceAtEpoch(1, str(tmp_path / "killed"))], **FIT)


def test_a_named_run_continues_from_its_last_committed_epoch(tmp_path):
    x, y = blobs(n=64)
    twin = mlp()
    twin_history = twin.fit(x, y, epochs=3, verbose=0, **FIT)
    first = RemoteFit(mlp(), checkpoint_dir=str(tmp_path), run_name="exp1")
    first.fit(x, y, epochs=2, verbose=0, **FIT)
    model = mlp()  # a fresh model: the run's state comes from its checkpoint
    history = RemoteFit(model, checkpoint_dir=str(tmp_path), run_name="exp1").fit(
        x, y, epochs=3, verbose=0, **FIT)
    assert history.epoch == [0, 1, 2]
    np.testing.assert_allclose(history.history["loss"], twin_history.history["loss"], rtol=0, atol=1e-5)
    assert_close(model.get_weights(), twin.get_weights())
    assert names(str(tmp_path / "exp1")) == ["epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras"]


def test_more_failures_than_max_failures_lists_each(tmp_path):
    x, y = blobs(n=64)
    marker = tmp_path / "killed"
    with pytest.raises(WorkerLostError, match=r"failed 2 times, more than max_failures=1:\n  1\. .*\n  2\. "):
        RemoteFit(mlp(), checkpoint_dir=str(tmp_path / "ckpts"), max_failures=1).fit(
            x, y, epochs=3, verbose=0, callbacks=[KillOnceAtEpoch(1, str(marker), always=True)], **FIT)
    assert len(marker.read_text().split()) == 2
