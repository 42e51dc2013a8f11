"""Home SIGKILLed while ``RemoteFit.fit`` runs: nothing goes on training for nobody; and a stop reaches
the two workers of a multi-worker fit at different moments, yet they stop at the same epoch end.

On a cluster given by address (a Ray Job) the run stops once home's heartbeat has been silent for
``home_grace_s`` and ``gpu-proxy runs`` says why; on the embedded cluster the run goes with home.
(Ctrl-C: tests/keras/test_keras_stops.py; a killed worker with max_failures: tests/keras/test_keras_restarts.py.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import psutil
import pytest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


def _start_home(cluster: str, folder: Path, env: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})).items()
           if k != "GPU_PROXY_CLUSTER"}  # "embedded" means the default cluster, whatever the shell says
    return subprocess.Popen([sys.executable, "-m", "tests.keras_project.home_fit", cluster, str(folder)],
                            cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _epochs_begun(folder: Path) -> list[tuple[int, int]]:
    text = (folder / "rank0.txt").read_text() if (folder / "rank0.txt").exists() else ""
    return [tuple(map(int, line.split())) for line in text.splitlines() if line]


def _kill_home_once_training(home: subprocess.Popen, folder: Path, epochs: int = 2) -> float:
    deadline = time.monotonic() + 120
    while len(_epochs_begun(folder)) < epochs:
        assert home.poll() is None, "home ended before training"
        assert time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.2)
    os.killpg(home.pid, signal.SIGKILL)
    home.wait(10)
    return time.monotonic()


def _cli_runs(head) -> str:
    return subprocess.run([sys.executable, "-m", "gpu_proxy.cli", "runs", "-c", head.dashboard_url],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_TOKEN_PATH=head.token_path),
                          capture_output=True, text=True, timeout=60).stdout


def test_by_address_a_run_whose_home_was_killed_stops_and_says_why(ray_head, tmp_path):
    home = _start_home(ray_head.dashboard_url, tmp_path, {"RAY_AUTH_TOKEN_PATH": ray_head.token_path})
    killed_at = _kill_home_once_training(home, tmp_path)
    run = (tmp_path / "run").read_text()
    expected = "STOPPED (home closed the connection)"  # the run server saw home's process end
    row = ""
    while time.monotonic() - killed_at < 90:
        row = next((line for line in _cli_runs(ray_head).splitlines() if line.startswith(run)), "")
        if "STOPPED" in row:
            break
        time.sleep(1)
    stopped_after = time.monotonic() - killed_at
    print(f"by address: home SIGKILLed -> `gpu-proxy runs` shows STOPPED after {stopped_after:.1f} s")
    assert expected in row, row
    assert stopped_after < 30  # the closed connection, the next epoch end (0.5 s), the run's end
    begun = len(_epochs_begun(tmp_path))
    time.sleep(2)
    assert len(_epochs_begun(tmp_path)) == begun  # and it trains no more


def test_on_the_embedded_cluster_the_run_goes_with_home(tmp_path):
    home = _start_home("embedded", tmp_path)
    killed_at = _kill_home_once_training(home, tmp_path)
    worker = _epochs_begun(tmp_path)[-1][0]
    while time.monotonic() - killed_at < 60:
        try:
            if psutil.Process(worker).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    gone_after = time.monotonic() - killed_at
    print(f"embedded: home SIGKILLed -> its worker gone after {gone_after:.1f} s")
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    begun = len(_epochs_begun(tmp_path))
    time.sleep(1)
    assert len(_epochs_begun(tmp_path)) == begun


class SlowRankOneEpochEnds(keras.callbacks.Callback):
    """Runs on the workers: rank 1 reaches each epoch's stop check 1 s after rank 0, so a stop request
    that arrives in between is seen by rank 1 one epoch before rank 0."""

    def on_epoch_end(self, epoch, logs=None):
        if os.environ["RANK"] == "1":
            time.sleep(1.0)


@pytest.mark.timeout(200)
def test_two_workers_stop_at_the_same_epoch_end_whenever_the_stop_arrives(local_cluster):
    import threading

    from gpu_proxy_keras import RemoteFit
    from tests.keras_project.models import blobs, mlp

    class PressAfterFirstEpoch(keras.callbacks.Callback):  # at home: Ctrl-C as epoch 0's end arrives
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                threading.Thread(target=lambda: signal.pthread_kill(main, signal.SIGINT), daemon=True).start()

    main = threading.main_thread().ident
    x, y = blobs(n=64)
    model = mlp()
    remote = RemoteFit(model, cluster=local_cluster, num_workers=2, home_callbacks=[PressAfterFirstEpoch()])
    previous = signal.getsignal(signal.SIGINT)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            remote.fit(x, y, batch_size=32, epochs=50, shuffle=False, verbose=0, callbacks=[SlowRankOneEpochEnds()])
    finally:
        signal.signal(signal.SIGINT, previous)
    epochs = len(model.history.epoch)
    print(f"2 workers: stopped after {epochs} epochs, {time.monotonic() - started:.1f} s")
    assert 1 <= epochs < 50 and int(model.optimizer.iterations.numpy()) == 2 * epochs


@pytest.mark.parametrize("value", ["5m", float("nan"), True, 1])
def test_a_bad_home_grace_is_refused_naming_it(value):
    from gpu_proxy.errors import ConfigurationError
    from gpu_proxy_keras import RemoteFit
    from tests.keras_project.models import mlp

    with pytest.raises(ConfigurationError, match=r"home_grace_s=.*give seconds as a number >= 6"):
        RemoteFit(mlp(), home_grace_s=value)
