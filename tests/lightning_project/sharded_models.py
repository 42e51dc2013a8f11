"""Tiny models for sharded runs: the same network built at home, built in ``configure_model``, or sharded by hand."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES, CLASSES = 16, 4


def network() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def loader(samples: int = 64, batch_size: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, FEATURES, generator=generator)
    y = (x[:, :CLASSES] * 3).argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class SmallNet(L.LightningModule):
    """Built where it is created (at home, or on the meta device under ``init_module(empty_init=True)``)."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = network()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        # Adam: its per-parameter state is sharded too, and a resume must restore it
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class BuiltOnWorkers(SmallNet):
    """Its layers exist only once ``configure_model`` runs: on the workers, never at home."""

    def __init__(self, lr: float = 0.1) -> None:
        L.LightningModule.__init__(self)  # not SmallNet's: that would build the layers here
        self.save_hyperparameters({"lr": lr})
        self.net: nn.Module | None = None

    def configure_model(self) -> None:
        if self.net is None:  # Lightning calls it again for each stage; build once
            self.net = network()


class ShardedByHand(SmallNet):
    """For ModelParallelStrategy: ``fully_shard`` each layer in ``configure_model``."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


class LossHistory(Callback):
    """Rank 0's loss at every step (plain floats, so they come home with the callback)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 0:
            self.losses.append(float(outputs["loss"].detach()))


class RecordStarts(Callback):
    """Appends the global step each attempt of a fit starts at, to a file (attempts are separate processes)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step}\n")


class KillAt(Callback):
    """SIGKILLs rank ``rank`` at ``at_step``, once (a marker file remembers)."""

    def __init__(self, rank: int, at_step: int, marker: str) -> None:
        self.rank, self.at_step, self.marker = rank, at_step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import signal

        if trainer.global_rank == self.rank and trainer.global_step == self.at_step and not os.path.exists(self.marker):
            Path(self.marker).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileCommitting(Callback):
    """SIGKILLs rank 0 as it is about to commit its second checkpoint: the shards are written, the manifest
    not yet (a marker file remembers, so the restarted run goes on)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def setup(self, trainer, pl_module, stage) -> None:
        io, marker = trainer.strategy.checkpoint_io, self.marker
        save, seen = io.save_checkpoint, []

        def save_or_die(checkpoint, path, storage_options=None):
            seen.append(path)
            if len(seen) == 2 and not os.path.exists(marker):
                import signal

                Path(marker).write_text("killed")
                os.kill(os.getpid(), signal.SIGKILL)
            return save(checkpoint, path, storage_options)

        io.save_checkpoint = save_or_die


class RecordPrecision(Callback):
    """What precision the workers trained in (a plain str, so it comes home)."""

    def __init__(self) -> None:
        self.seen: str | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        config = trainer.strategy.mixed_precision_config
        self.seen = f"{type(trainer.precision_plugin).__name__}/{config.param_dtype if config else None}"
