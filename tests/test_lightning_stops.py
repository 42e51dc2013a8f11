"""A stop request (Ctrl-C) ends validation, test and predict loops within a few batches, on every rank
at the same batch, as it ends training."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy_lightning.worker_events import STOP_CHECK_EVERY
from tests.lightning_project.models import DigitsModel

pytestmark = pytest.mark.usefixtures("local_cluster")

BATCHES_PER_RANK = 1000  # 1000 x 20 ms: a loop that, unstopped, runs 20 s


class SlowEval(DigitsModel):
    """Notes in ``folder/<stage><rank>`` the index of the last batch each rank ran."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def _note(self, stage: str, batch_idx: int) -> None:
        time.sleep(0.02)
        Path(self.folder, f"{stage}{self.global_rank}").write_text(str(batch_idx))

    def validation_step(self, batch, batch_idx):
        self._note("validate", batch_idx)

    def test_step(self, batch, batch_idx):
        self._note("test", batch_idx)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        self._note("predict", batch_idx)
        return batch[0].sum(-1)


def last_batch(folder: Path, stage: str, rank: int) -> int:
    try:
        return int((folder / f"{stage}{rank}").read_text() or -1)
    except (FileNotFoundError, ValueError):
        return -1


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_a_stop_request_ends_an_evaluation_loop_within_a_few_batches(tmp_path, stage):
    x = torch.randn(2 * BATCHES_PER_RANK + 1, 64)  # odd: predict's ranks get 1001 and 1000 batches
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=1)
    trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    previous = signal.getsignal(signal.SIGINT)
    sent: dict[str, float] = {}

    def interrupt_once_running():
        deadline = time.monotonic() + 60
        while last_batch(tmp_path, stage, 0) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        sent["batch"], sent["at"] = last_batch(tmp_path, stage, 0), time.monotonic()
        signal.raise_signal(signal.SIGINT)

    threading.Thread(target=interrupt_once_running, daemon=True).start()
    try:
        with pytest.raises(SystemExit):  # Lightning's own answer to Ctrl-C, as in a local run
            getattr(trainer, stage)(SlowEval(str(tmp_path)), loader)
    finally:
        signal.signal(signal.SIGINT, previous)
    ended = [last_batch(tmp_path, stage, rank) for rank in (0, 1)]
    assert time.monotonic() - sent["at"] < 8
    assert ended[0] == ended[1], f"the ranks stopped at different batches: {ended}"
    assert (ended[0] + 1) % STOP_CHECK_EVERY == 0  # at a stop check
    # A stop reaches the workers within a fraction of a second; then at most STOP_CHECK_EVERY batches.
    assert ended[0] - sent["batch"] < 50, (sent, ended)
    assert trainer.state.status == "interrupted"
