"""Restarts of a multi-worker Keras fit whose worker died: there each rank trains in a child process
of its Ray worker (fresh_process.py), so the child's death must count as a lost worker."""
from __future__ import annotations

import time

import keras
import numpy as np
import psutil
import pytest

from gpu_proxy import WorkerLostError
from gpu_proxy.runs import raise_for_outcomes
from gpu_proxy.shipping import pack_exception
from gpu_proxy.storage import list_committed
from gpu_proxy_keras import RemoteFit
from tests.keras_project.callbacks import KillRankOnceAtEpoch, RecordEpochBegins, SlowEpochs, StopAtEpochEnd
from tests.keras_project.models import blobs, mlp
from tests.support import keras_reference

pytestmark = [pytest.mark.usefixtures("local_cluster"), pytest.mark.timeout(600)]

FIT = dict(batch_size=32, epochs=4, shuffle=False)  # 64 samples: 2 global steps per epoch


def epoch_begins(folder, rank):
    """{pid: [epochs begun]} of one rank, in order of the pids' first line."""
    begun: dict[int, list[int]] = {}
    for line in (folder / f"rank{rank}.txt").read_text().split("\n"):
        if line:
            pid, epoch = map(int, line.split())
            begun.setdefault(pid, []).append(epoch)
    return begun


def running(pids, wait_s=30.0):
    """The pids still alive after up to wait_s: a child outlives its killed parent by a moment."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_two_workers_one_killed_restart_from_the_last_committed_epoch(tmp_path, capsys):
    x, y = blobs(n=64)
    model = mlp()
    reference = keras_reference.fit_with_replicas(tmp_path, model, x, y, replicas=2, **FIT)
    begins, marker, ckpts = tmp_path / "begins", tmp_path / "killed", tmp_path / "ckpts"
    begins.mkdir()
    remote = RemoteFit(model, num_workers=2, checkpoint_dir=str(ckpts), max_failures=1)
    history = remote.fit(x, y, verbose=0, **FIT, callbacks=[
        RecordEpochBegins(str(begins)), KillRankOnceAtEpoch(2, str(marker), rank=1, committed_in=str(ckpts))])

    killed = marker.read_text().split()
    assert len(killed) == 1  # killed once, at epoch 3's start, on rank 1
    assert "restarting from epoch 3" in capsys.readouterr().err
    # Rank 1's first training process began epochs 0-2 and died in 2's begin; rank 0's was stopped
    # (it may not have reached epoch 2 yet). The restarted ones began at the committed epoch.
    first, second = epoch_begins(begins, 1).values()
    assert first == [0, 1, 2] and second == [2, 3]
    first, second = epoch_begins(begins, 0).values()
    assert first in ([0, 1], [0, 1, 2]) and second == [2, 3]
    assert int(killed[0]) in epoch_begins(begins, 1)

    assert history.epoch == [0, 1, 2, 3] and history.model is model and model.history is history
    assert set(history.history) == set(reference["history"]) == {"loss", "accuracy"}
    for key, values in reference["history"].items():
        np.testing.assert_allclose(history.history[key], values, rtol=0, atol=1e-5, err_msg=key)
    assert int(model.optimizer.iterations.numpy()) == 8  # 2 global steps x 4 epochs, as unbroken
    urls = list_committed(remote.run_url)
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"epoch-000{i}.keras" for i in (1, 2, 3, 4)]
    last = keras.saving.load_model(urls[-1])
    for a, b in zip(last.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    # No training process outlives the run: not the killed rank's peer, not the finished ones.
    pids = [pid for rank in (0, 1) for pid in epoch_begins(begins, rank)]
    assert len(pids) == 4
    assert running(pids) == []


def test_a_fit_stopped_after_a_restart_keeps_the_epochs_committed_before_it(tmp_path, capsys):
    x, y = blobs(n=64)
    model, marker, ckpts = mlp(), tmp_path / "killed", tmp_path / "ckpts"
    remote = RemoteFit(model, num_workers=1, checkpoint_dir=str(ckpts), max_failures=1,
                       home_callbacks=[StopAtEpochEnd(2)])
    history = remote.fit(x, y, verbose=0, **dict(FIT, epochs=8), callbacks=[
        KillRankOnceAtEpoch(1, str(marker), rank=0, committed_in=str(ckpts)), SlowEpochs(0.5)])
    assert "restarting from epoch 2" in capsys.readouterr().err  # epoch 0 committed, then trained again from 1
    # Stopped (a home stop lands at an epoch end soon after epoch 2's): the History joins the resumed
    # checkpoint's epoch 0 and the restarted attempt's epochs from 1, with none missing.
    assert 3 <= len(history.epoch) < 8 and history.epoch == list(range(len(history.epoch)))
    assert len(history.history["loss"]) == len(history.epoch) and model.history is history


def test_a_training_process_death_outranks_the_other_ranks_errors():
    # The peer of a dead rank may fail in its collective before home hears of the death.
    outcomes = [{"rank": 0, "error": pack_exception(RuntimeError("collective: peer unavailable"))},
                {"rank": 1, "error": pack_exception(WorkerLostError("its process was killed by SIGKILL"))}]
    with pytest.raises(WorkerLostError) as raised:
        raise_for_outcomes(outcomes)
    assert str(raised.value) == "1 worker(s) died during the run: rank 1: its process was killed by SIGKILL"


def test_on_the_job_path_a_killed_worker_restarts_from_the_last_committed_epoch(ray_head, tmp_path, capsys):
    from gpu_proxy import RayCluster
    from tests.keras_project.callbacks import KillOnceAtEpoch

    x, y = blobs(n=64)
    model, marker, ckpts = mlp(), tmp_path / "killed", tmp_path / "ckpts"
    fit = dict(batch_size=32, epochs=3, shuffle=False, verbose=0)
    remote = RemoteFit(model, cluster=RayCluster(ray_head.dashboard_url, token=ray_head.token),
                       checkpoint_dir=str(ckpts), max_failures=1)
    # The Ray worker process itself is SIGKILLed as epoch index 2 begins (one worker trains in it, no
    # child process); epochs 1-2 (indices 0-1) are committed, so the run restarts at the third.
    history = remote.fit(x, y, callbacks=[KillOnceAtEpoch(2, str(marker))], **fit)
    assert len(marker.read_text().split()) == 1
    err = capsys.readouterr().err
    assert "restarting from epoch 3" in err, [line for line in err.splitlines() if "gpu-proxy" in line]
    assert history.epoch == [0, 1, 2] and model.history is history
    assert int(model.optimizer.iterations.numpy()) == 6  # 2 steps x 3 epochs, as unbroken
    twin = mlp()
    twin.fit(x, y, **fit)
    for got, expected in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
