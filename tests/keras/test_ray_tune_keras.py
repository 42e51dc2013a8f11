"""Ray Tune on the cluster with Keras: trials fit through RemoteFit inside their own placement groups,
reported and checkpointed by gpu_proxy_keras.tune (docs/sweeps.md, "Ray Tune with Keras")."""
from __future__ import annotations

import json
import os
import pickle
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from typing_extensions import override
from ray.util.placement_group import placement_group_table

from gpu_proxy.errors import ConfigurationError, ShippingError
from gpu_proxy.runs.pool import current_pool
from gpu_proxy_keras import RemoteFit
from gpu_proxy_keras.tune import TuneReportCallback, restore_checkpoint
from tests import tune_keras_project
from tests.keras_project.callbacks import SlowEpochs
from tests.keras_project.models import blobs, mlp
from tests.tune_keras_project import CASES, CPUS_PER_WORKER, MAX_EPOCHS, STEPS_PER_EPOCH, model_for

pytestmark = [pytest.mark.tf, pytest.mark.timeout(300)]


def notes(folder: Path, trial_id: str, kind: str) -> list[dict]:
    entries = [json.loads(line) for line in (folder / f"{trial_id}.jsonl").read_text().splitlines()]
    return [entry for entry in entries if entry["kind"] == kind]


def weights(folder: Path, name: str) -> list[np.ndarray]:
    with np.load(folder / f"{name}.npz") as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def assert_same_weights(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def gpu_proxy_groups() -> set[str]:
    return {pg_id for pg_id, entry in placement_group_table().items() if entry["name"].startswith("gpu-proxy-")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_asha_sweep_of_keras_trials_reports_their_epochs_restores_a_failed_one_and_frees_a_stopped_ones_workers(
        local_cluster, tmp_path):
    groups_before = gpu_proxy_groups()
    started = time.monotonic()
    results = tune_keras_project.tuner(str(tmp_path), str(tmp_path / "storage")).fit()
    print(f"{len(CASES)} Keras trials in {time.monotonic() - started:.1f} s")
    by_case = {r.config["case"]: r for r in results}
    assert sorted(by_case) == list(range(len(CASES))) and all(r.error is None for r in results), \
        [str(r.error) for r in results]
    restored, stopped = by_case[0], by_case[1]
    restored_id, stopped_id = restored.metrics["trial_id"], stopped.metrics["trial_id"]

    # What Tune got per iteration is what rank 0's History recorded per epoch (its logs, as they were).
    for result in results:
        trial_id = result.metrics["trial_id"]
        logged = {n["epoch"] + 1: n["logs"] for n in notes(tmp_path, trial_id, "epoch")}
        frame = result.metrics_dataframe
        reported = {int(i): {"loss": loss, "val_loss": val} for i, loss, val in
                    zip(frame["training_iteration"], frame["loss"], frame["val_loss"])}
        assert reported and reported == {i: logged[i] for i in reported}, trial_id
        # Each attempt's worker ran inside the trial's own placement group, in the bundle after the trainable's.
        trainables = notes(tmp_path, trial_id, "trainable")
        assert [w["pg"] for w in notes(tmp_path, trial_id, "worker")] == [t["pg"] for t in trainables]
        assert all(t["bundles"] == {"0": {"CPU": 0.5}, "1": {"CPU": CPUS_PER_WORKER}} for t in trainables)
    assert gpu_proxy_groups() == groups_before  # no placement group of gpu-proxy's own: Tune's were used

    # The failed trial was restored once from its epoch-0 checkpoint: the weights and the optimizer's
    # state of that epoch's end, and fit went on at epoch 1 (History holds the epochs of that fit).
    assert [t["initial_epoch"] for t in notes(tmp_path, restored_id, "trainable")] == [0, 1]
    assert_same_weights(weights(tmp_path, f"{restored_id}-restored"), weights(tmp_path, f"{restored_id}-epoch0"))
    [history] = notes(tmp_path, restored_id, "history")
    assert history["epoch"] == list(range(1, MAX_EPOCHS)) and history["iterations"] == STEPS_PER_EPOCH * MAX_EPOCHS
    frame = restored.metrics_dataframe  # (whether it keeps the failed attempt's rows varies: by iteration)
    reported = dict(zip(frame["training_iteration"], frame["val_loss"]))
    assert history["history"]["val_loss"] == [reported[epoch + 1] for epoch in history["epoch"]]
    assert restored.metrics["training_iteration"] == MAX_EPOCHS

    # ASHA stopped the poor trial at its first rung, mid-run: fit never returned in its trainable,
    # and its worker process ended with the trial, as did the trial's placement group.
    assert stopped.metrics["training_iteration"] == 1 and stopped.metrics["val_loss"] > restored.metrics["val_loss"]
    assert not notes(tmp_path, stopped_id, "history") and len(notes(tmp_path, stopped_id, "epoch")) < MAX_EPOCHS
    pids = [w["pid"] for r in results for w in notes(tmp_path, r.metrics["trial_id"], "worker")]
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if alive(pid)]
    states = {pg_id: entry["state"] for pg_id, entry in placement_group_table().items()}
    trial_groups = {t["pg"] for r in results for t in notes(tmp_path, r.metrics["trial_id"], "trainable")}
    assert {states.get(pg, "REMOVED") for pg in trial_groups} == {"REMOVED"}

    # The best trial's last checkpoint holds the model its fit ended with: weights and optimizer state.
    best = results.get_best_result()
    assert best.metrics["trial_id"] == restored_id
    model = model_for(CASES[0]["lr"])
    assert restore_checkpoint(model, best.checkpoint) == MAX_EPOCHS
    assert_same_weights(model.get_weights(), weights(tmp_path, f"{restored_id}-fit"))
    assert int(model.optimizer.iterations.numpy()) == STEPS_PER_EPOCH * MAX_EPOCHS


class ExitsLikeTune(keras.callbacks.Callback):
    """A home callback doing what ray.tune.report does once Tune stopped the trial (ASHA)."""

    @override
    def on_epoch_end(self, epoch, logs=None):
        raise SystemExit(0)


def test_a_stop_from_tune_ends_the_remote_fit_at_its_next_epoch_end_with_the_epochs_done(local_cluster):
    model = model_for(0.05)
    x, y = blobs(n=64)
    with pytest.raises(SystemExit):
        RemoteFit(model, cluster=local_cluster, home_callbacks=[ExitsLikeTune()]).fit(
            x, y, batch_size=16, epochs=8, shuffle=False, verbose=0, callbacks=[SlowEpochs(0.3)])
    # The workers stopped first (the one more epoch they train before they see the stop), and the model
    # holds what they trained, as a local fit that tune.report ended does.
    epochs = len(model.history.epoch)
    assert 1 <= epochs < 8 and int(model.optimizer.iterations.numpy()) == STEPS_PER_EPOCH * epochs
    assert [group for group in current_pool().describe() if group["state"] == "busy"] == []


class StagedBeforeTheReport(keras.callbacks.Callback):
    """A home callback before TuneReportCallback: the model rank 0 staged for this epoch's report."""

    def __init__(self, report: TuneReportCallback) -> None:
        super().__init__()
        self.report, self.staged = report, []

    @override
    def on_epoch_end(self, epoch, logs=None):
        from gpu_proxy_keras.tune import staged_folder

        path = Path(staged_folder(self.report.staging_dir, epoch)) / "model.keras"
        self.staged.append(keras.saving.load_model(path).get_weights())


def test_with_two_workers_rank_0_stages_each_epochs_model_for_the_report(local_cluster):
    """Outside a trial (tune.report only warns there): in a 2-worker TensorFlow fit rank 0 alone saves
    at each epoch end, its peer not waiting on it, and the staged copy is the epoch's model."""
    report = TuneReportCallback()
    staged = StagedBeforeTheReport(report)
    model = mlp(seed=1)  # compiled with a metric: its variables are sync-on-read under MultiWorkerMirroredStrategy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Tune's "report is meant to be called in a trial"
        RemoteFit(model, cluster=local_cluster, num_workers=2, resources_per_worker={"CPU": 0.5},
                  home_callbacks=[staged, report]).fit(*blobs(n=64), batch_size=16, epochs=2, shuffle=False,
                                                       verbose=0)
    assert len(staged.staged) == 2
    assert_same_weights(staged.staged[-1], model.get_weights())  # the last epoch's is the trained model
    assert list(Path(report.staging_dir).iterdir()) == []  # each staged copy removed after its report


def test_the_report_callback_refuses_bad_values_and_the_workers_before_anything_runs(local_cluster):
    with pytest.raises(ConfigurationError, match="metrics=3"):
        TuneReportCallback(metrics=3)
    with pytest.raises(ConfigurationError, match="'model.h5'"):
        TuneReportCallback(filename="model.h5")
    with pytest.raises(ConfigurationError, match="staging_dir=''"):
        TuneReportCallback(staging_dir="")
    with pytest.raises(ConfigurationError, match="home_callbacks"):
        pickle.dumps(TuneReportCallback())
    with pytest.raises(ShippingError, match=r"callbacks.*RemoteFit\(model, home_callbacks="):  # not to the workers
        RemoteFit(model_for(0.01), cluster=local_cluster).fit(*blobs(n=16), callbacks=[TuneReportCallback()])
    assert TuneReportCallback(save_checkpoint=False).worker_callback() is None


def test_rank_0_on_another_host_than_the_trainable_is_refused_for_a_local_staging_folder(tmp_path):
    saver = TuneReportCallback(staging_dir=str(tmp_path)).worker_callback()
    saver.home_host = "the-trainables-host"  # as if the trainable ran elsewhere
    with pytest.raises(ConfigurationError, match="staging_dir= an fsspec URL"):
        saver.on_train_begin()
    TuneReportCallback(staging_dir=f"file://{tmp_path}").worker_callback().on_train_begin()  # a URL: any host


def test_a_checkpoint_staged_on_an_fsspec_url_restores_the_weights_and_the_optimizer_state(tmp_path):
    from gpu_proxy.tune_support import staged_checkpoint
    from gpu_proxy_keras.tune import EPOCH_KEY, staged_folder

    report = TuneReportCallback(staging_dir=f"file://{tmp_path}/staging")
    trained = model_for(0.05)
    x, y = blobs(n=64)
    trained.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[report.worker_callback()])  # as rank 0
    checkpoint = staged_checkpoint(staged_folder(report.staging_dir, 1))  # what home reports for epoch 1
    checkpoint.set_metadata({EPOCH_KEY: 1})
    model = model_for(0.05)
    assert restore_checkpoint(model, checkpoint) == 2
    assert_same_weights(model.get_weights(), trained.get_weights())
    assert_same_weights([np.asarray(v) for v in model.optimizer.variables],
                        [np.asarray(v) for v in trained.optimizer.variables])


def test_a_restore_without_a_checkpoint_leaves_the_model_and_one_not_ours_is_refused(tmp_path):
    from ray import tune

    model = model_for(0.01)
    before = model.get_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Tune's "get_checkpoint is meant to be called in a trial"
        assert restore_checkpoint(model) == 0  # outside a trial, Tune has no checkpoint for it
    assert_same_weights(model.get_weights(), before)
    keras.saving.save_model(model, tmp_path / "model.keras")
    with pytest.raises(ConfigurationError, match="not a gpu_proxy_keras.tune.TuneReportCallback checkpoint"):
        restore_checkpoint(model, tune.Checkpoint.from_directory(str(tmp_path)))


def test_each_report_adds_the_trials_cost_on_a_metered_cluster_and_nothing_on_an_unmetered_one(monkeypatch):
    """The shared cost code (gpu_proxy/tune_cost.py) in Keras' callback: the budget path is tested with
    Lightning (tests/lightning/test_ray_tune_cost.py)."""
    from ray import tune

    from gpu_proxy.tune_cost import MeterFollower, TrialCost

    reported: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reported.append(metrics))
    now, value = [0.0], [None]
    follower = MeterFollower(read=lambda: value[0], clock=lambda: now[0])
    callback = TuneReportCallback(save_checkpoint=False)
    callback.cost = TrialCost(follower, share=0.25)
    callback.on_epoch_end(0, {"loss": 1.0})
    value[0] = json.dumps({"spent_usd": 1.0, "usd_per_hour": 8.0, "budget_usd": None, "budget_reached": False}).encode()
    follower.poll()
    now[0] += 900  # a quarter of an hour at $8/h, a quarter of it this trial's
    callback.on_epoch_end(1, {"loss": 0.5})
    assert reported == [{"loss": 1.0}, {"loss": 0.5, "cost_usd": pytest.approx(0.5), "cluster_spent_usd": pytest.approx(3.0)}]
