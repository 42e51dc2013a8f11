"""A small user project: a model, data and a probe callback, imported by the tests like user code."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def digits_tensors(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    return (x[:limit], y[:limit]) if limit else (x, y)


class DigitsModel(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.02, fail_on_rank: int | None = None,
                 unused_layer: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.unused = nn.Linear(3, 3) if unused_layer else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.hparams.fail_on_rank == self.global_rank and batch_idx == 1:
            raise ValueError(f"boom on rank {self.global_rank}")
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True, prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean(), sync_dist=True)

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class DigitsData(L.LightningDataModule):
    def __init__(self, batch_size: int = 32, limit: int = 600, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size, self.limit, self.num_workers = batch_size, limit, num_workers

    def setup(self, stage: str) -> None:
        x, y = digits_tensors(self.limit)
        split = int(len(x) * 0.8)
        self.train_set = TensorDataset(x[:split], y[:split])
        self.val_set = TensorDataset(x[split:], y[split:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class IndexedInputs(Dataset):
    """Inputs only, so predictions can be checked sample by sample."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class RecordRanks(Callback):
    """Writes what each rank saw to ``folder/rank{N}.pt``; the embedded cluster shares this filesystem."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _write(self, trainer, pl_module, name: str, extra: dict | None = None) -> None:
        record = {
            "pid": os.getpid(), "global_rank": trainer.global_rank, "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes, "node_rank": trainer.node_rank, "local_rank": trainer.local_rank,
            "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "current_epoch": trainer.current_epoch, "global_step": trainer.global_step,
            "callback_metrics": {k: v.clone() for k, v in trainer.callback_metrics.items()},
            "logged_metrics": {k: v.clone() for k, v in trainer.logged_metrics.items()},
            "ddp_kwargs": dict(getattr(trainer.strategy, "_ddp_kwargs", {})),
            "best_model_path": getattr(trainer.checkpoint_callback, "best_model_path", None),
            "best_model_score": getattr(trainer.checkpoint_callback, "best_model_score", None),
        }
        record.update(extra or {})
        torch.save(record, Path(self.folder) / f"{name}{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.sampler
        val_sampler = trainer.val_dataloaders.sampler if trainer.val_dataloaders is not None else None
        self._samplers = {
            "train_sampler": (type(sampler).__name__, getattr(sampler, "num_replicas", None),
                              getattr(sampler, "rank", None), getattr(sampler, "shuffle", None)),
            "val_sampler": (type(val_sampler).__name__, getattr(val_sampler, "num_replicas", None),
                            getattr(val_sampler, "rank", None), getattr(val_sampler, "shuffle", None)),
            "strategy_model": type(trainer.strategy.model).__name__,
            "find_unused_parameters": getattr(trainer.strategy.model, "find_unused_parameters", None),
        }

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "fit", getattr(self, "_samplers", {}))

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")


def load_record(folder, name: str, rank: int) -> dict:
    return torch.load(Path(folder) / f"{name}{rank}.pt", weights_only=False)


class KillOnce(Callback):
    """SIGKILLs this worker process at a chosen global step, the first time only (a marker file remembers)."""

    def __init__(self, rank: int, at_step: int, marker: str) -> None:
        self.rank, self.at_step, self.marker = rank, at_step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import signal

        if trainer.global_rank == self.rank and trainer.global_step == self.at_step:
            if not os.path.exists(self.marker):
                Path(self.marker).write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)


def fit_and_check_against_rank0(cluster, folder) -> None:
    """A 2-worker fit on ``cluster`` whose home model and trainer end as rank 0's did."""
    from gpu_proxy_lightning import RemoteStrategy

    model = DigitsModel()
    trainer = L.Trainer(strategy=RemoteStrategy(cluster=cluster), accelerator="cpu", devices=2, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RecordRanks(str(folder))])
    trainer.fit(model, datamodule=DigitsData(limit=200))
    rank0 = load_record(folder, "fit", 0)
    for key, value in rank0["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert trainer.state.finished and trainer.global_step == rank0["global_step"]
