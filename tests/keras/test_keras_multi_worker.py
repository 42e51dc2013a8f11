"""Several TensorFlow workers under MultiWorkerMirroredStrategy, made to work by ``_mwms_fix``."""
from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from gpu_proxy_keras import RemoteFit, _mwms_fix
from tests.keras_project.models import blobs, mlp
from tests.support import keras_reference

pytestmark = [pytest.mark.usefixtures("local_cluster"), pytest.mark.timeout(600)]

FIT = dict(batch_size=32, epochs=2, shuffle=False)


class RankMarker(keras.callbacks.CSVLogger):
    """A file-writing callback that also leaves a marker naming the rank that ran it."""

    def on_train_begin(self, logs=None):
        folder = os.path.dirname(self.filename)
        open(os.path.join(folder, f"ran-on-rank{os.environ['RANK']}"), "w").close()
        super().on_train_begin(logs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi_worker")
    x, y = blobs(n=96)
    validation = (x[:32], y[:32])
    model = mlp(with_custom_layer=True)
    reference = keras_reference.fit_with_replicas(folder, model, x, y, replicas=2,
                                                  validation_samples=32, **FIT)
    logs = folder / "logs"
    logs.mkdir()
    before = [w.copy() for w in model.get_weights()]
    history = RemoteFit(model, num_workers=2).fit(
        x, y, validation_data=validation, verbose=0, callbacks=[RankMarker(str(logs / "log.csv"))], **FIT)
    return {"reference": reference, "history": history, "model": model, "before": before, "logs": logs,
            "folder": folder, "data": (x, y)}


def test_two_workers_give_the_history_of_one_worker_with_two_replicas(runs):
    reference, history = runs["reference"], runs["history"]
    assert reference["replicas"] == 2
    assert set(history.history) == set(reference["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in reference["history"].items():
        np.testing.assert_allclose(history.history[key], values, rtol=0, atol=1e-5, err_msg=key)
    assert history.epoch == [0, 1]


def test_global_batch_size_means_what_it_means_locally(runs):
    # 96 samples, batch_size=32: 3 steps per epoch in all, as locally (not 3 per worker).
    assert runs["history"].params["steps"] == 3
    assert int(runs["model"].optimizer.iterations.numpy()) == 6


def test_local_model_takes_the_trained_weights(runs):
    model, before = runs["model"], runs["before"]
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
    x, y = runs["data"]
    # The local model now scores as the trained one did after its last epoch's validation.
    val_loss = model.evaluate(x[:32], y[:32], verbose=0, return_dict=True)["loss"]
    assert val_loss == pytest.approx(runs["history"].history["val_loss"][-1], abs=1e-5)


def test_file_writing_callbacks_run_on_rank_zero_only(runs):
    logs = runs["logs"]
    assert sorted(p.name for p in logs.iterdir() if p.name.startswith("ran-on")) == ["ran-on-rank0"]
    rows = (logs / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # header + one row per epoch


def test_the_fix_is_needed_and_gated_to_tested_versions(runs):
    assert _mwms_fix.is_tested_version(), "the fix was proven only for TESTED_VERSIONS; re-prove it"
    x, y = runs["data"]
    outcomes = keras_reference.fit_multi_worker_unpatched(runs["folder"], mlp(), x, y, workers=2, **FIT)
    assert all("PerReplica" in outcome for outcome in outcomes), outcomes


def test_training_callbacks_run_on_every_rank_and_stop_them_at_the_same_epoch(tmp_path):
    from tests.keras_project.callbacks import RecordEpochBegins

    x, y = blobs(n=64)
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-9), loss="sparse_categorical_crossentropy")
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(monitor="loss", min_delta=0.01, patience=0, factor=0.5),
        keras.callbacks.EarlyStopping(monitor="loss", min_delta=0.01, patience=1),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb")),
        RecordEpochBegins(str(tmp_path)),
    ]
    history = RemoteFit(model, num_workers=2).fit(x, y, batch_size=32, epochs=10, shuffle=False, verbose=0,
                                                  callbacks=callbacks)
    # No improvement: EarlyStopping ends both ranks after epoch 1 (a rank that went on would hang
    # in its collective), and ReduceLROnPlateau halved the rate once, as the local model shows.
    assert history.epoch == [0, 1]
    for rank in (0, 1):
        begun = [int(line.split()[1]) for line in (tmp_path / f"rank{rank}.txt").read_text().split("\n") if line]
        assert begun == [0, 1], rank
    assert float(np.asarray(model.optimizer.learning_rate)) == pytest.approx(5e-10, rel=1e-6)
    # The callbacks at home hold rank 0's state (issue 15), as a local fit leaves them.
    plateau, stop = callbacks[0], callbacks[1]
    assert (stop.stopped_epoch, stop.wait, stop.best_epoch) == (1, 1, 0)
    assert stop.best == pytest.approx(history.history["loss"][0], abs=1e-6)
    assert plateau.wait == 0 and plateau.best == pytest.approx(history.history["loss"][0], abs=1e-6)
    assert all(callback.model is model for callback in callbacks)
    assert len(list((tmp_path / "tb" / "train").iterdir())) == 1  # TensorBoard wrote from rank 0 only
