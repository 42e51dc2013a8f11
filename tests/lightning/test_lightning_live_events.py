"""While a run goes on, home sees it: the Trainer's own progress bar, home loggers, worker logs, Ctrl-C."""
from __future__ import annotations

import csv
import signal
import threading
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel

pytestmark = pytest.mark.usefixtures("local_cluster")


class TimedLogger(Logger):
    """A home logger that notes when each call arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, dict, int]] = []
        self.hparams: list[dict] = []
        self.finalized: list[str] = []

    name = property(lambda self: "timed")
    version = property(lambda self: 0)

    def log_metrics(self, metrics, step=None):
        self.calls.append((time.monotonic(), dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs):
        self.hparams.append(dict(params))

    def finalize(self, status):
        self.finalized.append(status)


class SlowModel(DigitsModel):
    def training_step(self, batch, batch_idx):
        time.sleep(0.05)
        return super().training_step(batch, batch_idx)


class RecordingBar(TQDMProgressBar):
    def __init__(self) -> None:
        super().__init__(refresh_rate=1)
        self.epoch_totals: list = []
        self.train_batches: list[tuple[int, int]] = []
        self.postfixes: list[dict] = []
        self.val_batches = 0

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        self.epoch_totals.append(self.total_train_batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.train_batches.append((trainer.current_epoch, batch_idx))
        self.postfixes.append(self.get_metrics(trainer, pl_module))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self.val_batches += 1


def test_home_logger_and_progress_bar_are_live(tmp_path):
    home = TimedLogger()
    bar = RecordingBar()
    trainer = L.Trainer(strategy=RemoteStrategy(home_loggers=[home]), accelerator="cpu", devices=2,
                        max_epochs=2, logger=CSVLogger(tmp_path / "remote"), callbacks=[bar],
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(SlowModel(), datamodule=DigitsData(limit=400))
    finished = time.monotonic()
    # 320 training samples / 2 ranks / batch 32 = 5 batches per epoch per rank
    assert bar.epoch_totals == [5, 5]
    assert bar.train_batches == [(0, i) for i in range(5)] + [(1, i) for i in range(5)]
    assert "train_loss_step" in bar.postfixes[-1] and bar.val_batches == 2 * 2
    assert home.calls and finished - home.calls[0][0] > 0.3, "metrics arrived only at the end"
    assert home.hparams == [{"hidden": 32, "lr": 0.02, "fail_on_rank": None, "unused_layer": False}]
    assert home.finalized == ["success"]


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_home_csv_logger_writes_what_the_remote_rank0_logger_writes(tmp_path):
    torch.manual_seed(0)
    remote_logger, home_logger = CSVLogger(tmp_path / "remote"), CSVLogger(tmp_path / "home")
    trainer = L.Trainer(strategy=RemoteStrategy(home_loggers=[home_logger]), accelerator="cpu", devices=2,
                        max_epochs=2, logger=remote_logger, log_every_n_steps=2, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DigitsModel(), datamodule=DigitsData(limit=400))
    remote_rows = read_rows(tmp_path / "remote" / "lightning_logs" / "version_0" / "metrics.csv")
    home_rows = read_rows(tmp_path / "home" / "lightning_logs" / "version_0" / "metrics.csv")
    assert len(home_rows) > 3 and home_rows == remote_rows


def test_a_single_worker_run_logs_what_a_local_run_logs(tmp_path):
    def run(strategy, folder):
        L.seed_everything(5)
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=2,
                            logger=CSVLogger(folder), log_every_n_steps=3, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(DigitsModel(), datamodule=DigitsData(limit=300))
        return read_rows(folder / "lightning_logs" / "version_0" / "metrics.csv")

    home = CSVLogger(tmp_path / "home")
    run(RemoteStrategy(home_loggers=[home]), tmp_path / "remote")
    local_rows = run("ddp", tmp_path / "local")  # one process, DistributedSampler, as on the worker
    home_rows = read_rows(tmp_path / "home" / "lightning_logs" / "version_0" / "metrics.csv")
    assert len(home_rows) == len(local_rows) > 3
    for home_row, local_row in zip(home_rows, local_rows):
        assert home_row.keys() == local_row.keys()
        assert (home_row["epoch"], home_row["step"]) == (local_row["epoch"], local_row["step"])
        for key, value in home_row.items():  # the worker runs torch with 1 thread: sums round differently
            assert (value == "") == (local_row[key] == "")
            if value:
                assert float(value) == pytest.approx(float(local_row[key]), rel=1e-5), key


class Chatty(DigitsModel):
    def on_train_start(self):
        print(f"hello from rank {self.global_rank}")
        print("10%\r50%\r100%")


def test_worker_output_comes_home_line_by_line_with_rank(capfd):
    trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Chatty(), datamodule=DigitsData(limit=100))
    out = capfd.readouterr().out
    assert "(rank 0) hello from rank 0" in out and "(rank 1) hello from rank 1" in out
    assert "(rank 0) 100%" in out and "10%" not in out


class Endless(DigitsModel):
    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


def test_ctrl_c_stops_workers_checkpoints_and_returns_quickly(tmp_path):
    trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=1000, logger=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt")], enable_progress_bar=False,
                        enable_model_summary=False)
    previous = signal.getsignal(signal.SIGINT)
    sent: dict[str, float] = {}

    def interrupt_soon():
        time.sleep(8)  # the workers are training by now
        sent["at"] = time.monotonic()
        signal.raise_signal(signal.SIGINT)

    threading.Thread(target=interrupt_soon, daemon=True).start()
    try:
        with pytest.raises(SystemExit):  # Lightning's own answer to Ctrl-C, as in a local run
            trainer.fit(Endless(), datamodule=DigitsData(limit=400))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - sent["at"] < 10
    assert trainer.state.status == "interrupted"
    assert (tmp_path / "ckpt" / "interrupted.ckpt").exists()
    from tests.lightning.test_lightning_errors import cpus_in_use

    assert cpus_in_use() == 0


def test_a_second_ctrl_c_aborts_at_once():
    trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=1000, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    previous = signal.getsignal(signal.SIGINT)
    sent: dict[str, float] = {}

    class IgnoresStop(Endless):
        def training_step(self, batch, batch_idx):
            time.sleep(0.3)  # slow steps: a graceful stop would take seconds
            return super().training_step(batch, batch_idx)

    def interrupt_twice():
        time.sleep(8)
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.2)
        sent["at"] = time.monotonic()
        signal.raise_signal(signal.SIGINT)

    threading.Thread(target=interrupt_twice, daemon=True).start()
    try:
        with pytest.raises(SystemExit):
            trainer.fit(IgnoresStop(), datamodule=DigitsData(limit=400))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - sent["at"] < 5
    from tests.lightning.test_lightning_errors import cpus_in_use

    assert cpus_in_use() == 0
