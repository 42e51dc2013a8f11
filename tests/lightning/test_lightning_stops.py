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


class SlowFit(DigitsModel):
    """Notes rank 0's step in ``folder/step``, and its weights when the run ends by Ctrl-C."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        if self.global_rank == 0:
            Path(self.folder, "step").write_text(str(self.trainer.global_step))
        return super().training_step(batch, batch_idx)


class KeepsFinalWeights(L.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_exception(self, trainer, pl_module, exception) -> None:
        if trainer.global_rank == 0:
            torch.save({"global_step": trainer.global_step, "state_dict": pl_module.state_dict()},
                       Path(self.folder, "final.pt"))


def test_ctrl_c_keeps_what_rank0_trained_so_far_like_a_local_run(tmp_path):
    from tests.lightning_project.models import DigitsData

    model = SlowFit(str(tmp_path))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=1000, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[KeepsFinalWeights(str(tmp_path))])
    previous = signal.getsignal(signal.SIGINT)

    def interrupt_after_40_steps():
        deadline = time.monotonic() + 60
        while last_batch(tmp_path, "step", "") < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        signal.raise_signal(signal.SIGINT)

    threading.Thread(target=interrupt_after_40_steps, daemon=True).start()
    try:
        with pytest.raises(SystemExit):
            trainer.fit(model, datamodule=DigitsData(limit=400))
    finally:
        signal.signal(signal.SIGINT, previous)
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert final["global_step"] >= 40
    assert trainer.global_step == final["global_step"]
    assert trainer.state.status == "interrupted"
    for key, value in model.state_dict().items():
        assert torch.equal(value, final["state_dict"][key]), key
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())


def test_launcher_kill_stops_the_run_gracefully_and_brings_the_state_home(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gpu_proxy.errors import RunStoppedError
    from tests.lightning_project.models import DigitsData

    model = SlowFit(str(tmp_path))
    trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=100, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[KeepsFinalWeights(str(tmp_path)), ModelCheckpoint(dirpath=tmp_path / "ckpt")])

    def kill_after_40_steps():
        deadline = time.monotonic() + 60
        while last_batch(tmp_path, "step", "") < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        trainer.strategy.launcher.kill(signal.SIGTERM)  # what a SIGTERM handler at home would call

    threading.Thread(target=kill_after_40_steps, daemon=True).start()
    with pytest.raises(RunStoppedError, match="stopped by signal SIGTERM"):
        trainer.fit(model, datamodule=DigitsData(limit=400))
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert 40 <= final["global_step"] == trainer.global_step < 100 * 5
    for key, value in model.state_dict().items():
        assert torch.equal(value, final["state_dict"][key]), key
    assert (tmp_path / "ckpt" / "interrupted.ckpt").exists()
