"""On the Ray Job path a second Ctrl-C aborts the run on the cluster too: the remote workers end within
seconds, not when the graceful stop the first press asked for would have come."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import lightning as L
import psutil
import pytest

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy import RayCluster
from gpu_proxy_lightning import RemoteStrategy
from gpu_proxy_lightning.worker_events import STOP_CHECK_EVERY
from tests.lightning_project.models import DigitsData, DigitsModel

pytestmark = pytest.mark.timeout(300)

STEP_S = 1.0  # a graceful stop waits for the next stop check: up to STOP_CHECK_EVERY steps of this


class SlowSteps(DigitsModel):
    """Each rank appends '<pid> <batch_idx>' to folder/steps<rank> as a step begins."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def training_step(self, batch, batch_idx):
        import os

        with open(Path(self.folder, f"steps{self.global_rank}"), "a") as file:
            file.write(f"{os.getpid()} {batch_idx}\n")
        time.sleep(STEP_S)
        return super().training_step(batch, batch_idx)


def _steps(folder: Path, rank: int) -> list[tuple[int, int]]:
    path = folder / f"steps{rank}"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_second_ctrl_c_on_the_job_path_ends_the_remote_workers(ray_head, tmp_path):
    trainer = L.Trainer(strategy=RemoteStrategy(cluster=RayCluster(ray_head.dashboard_url, token=ray_head.token)),
                        accelerator="cpu", devices=2, max_epochs=1000, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    previous = signal.getsignal(signal.SIGINT)
    sent: dict[str, float] = {}
    main = threading.main_thread().ident

    def ctrl_c():  # as a terminal's: to the main thread, which it wakes from a blocking wait
        signal.pthread_kill(main, signal.SIGINT)

    def interrupt_twice_after_a_stop_check():
        deadline = time.monotonic() + 120
        while not _steps(tmp_path, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        ctrl_c()  # just after step 0: the next stop check is steps away
        time.sleep(0.3)
        sent["at"] = time.monotonic()
        ctrl_c()

    threading.Thread(target=interrupt_twice_after_a_stop_check, daemon=True).start()
    try:
        with pytest.raises(SystemExit):
            trainer.fit(SlowSteps(str(tmp_path)), datamodule=DigitsData(limit=400))
    finally:
        signal.signal(signal.SIGINT, previous)
    home_back = time.monotonic() - sent["at"]
    workers = {pid for rank in (0, 1) for pid, _ in _steps(tmp_path, rank)}
    assert len(workers) == 2
    while any(psutil.pid_exists(pid) for pid in workers) and time.monotonic() - sent["at"] < 30:
        time.sleep(0.1)
    workers_gone = time.monotonic() - sent["at"]
    print(f"job path: second Ctrl-C -> home back after {home_back:.1f} s, remote workers gone after "
          f"{workers_gone:.1f} s")
    assert home_back < 5
    # A graceful stop would have let them run to the next stop check, STOP_CHECK_EVERY steps in.
    assert workers_gone < (STOP_CHECK_EVERY - 2) * STEP_S, workers_gone
    assert max(step for rank in (0, 1) for _, step in _steps(tmp_path, rank)) < STOP_CHECK_EVERY - 1
