"""A real-size model for the data plane's tests and bench: a tiny network that carries a large state.

The bulk is a buffer, so a training step costs almost nothing and the run's time is the time its
bytes take to travel. Rank 0 changes the bulk on the worker, so the state that comes home can only
be rank 0's, and :class:`StateDigest` records the digest of rank 0's whole state dict after fit,
which comes home with the callback's other plain attributes.
"""
from __future__ import annotations

import hashlib

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class BigModel(L.LightningModule):
    def __init__(self, megabytes: float) -> None:
        super().__init__()
        self.net = nn.Linear(8, 1)
        self.register_buffer("bulk", torch.randn(int(megabytes * 2**20 / 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])

    def on_train_start(self) -> None:
        with torch.no_grad():
            self.bulk.mul_(-1.0).add_(float(self.global_rank + 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


class StateDigest(Callback):
    """Records rank 0's state digest after fit (a plain str, so it comes home)."""

    def __init__(self) -> None:
        self.digest: str | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.digest = state_digest(pl_module)


def loader(samples: int = 16, batch_size: int = 8, extra_megabytes: float = 0) -> DataLoader:
    """A regression loader; ``extra_megabytes`` of unused rows make the dataset itself large."""
    rows = samples + int(extra_megabytes * 2**20 / 36)  # 8 inputs + 1 target, float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def trainer(strategy, **options) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                    limit_predict_batches=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                    enable_progress_bar=False, num_sanity_val_steps=0, callbacks=[StateDigest()])
    return L.Trainer(strategy=strategy, **{**settings, **options})


def fit_validate_predict(strategy, megabytes: float, data_megabytes: float = 0,
                         evaluate_megabytes: float | None = None) -> dict:
    """Fit, validate and predict a ``megabytes`` model on ``strategy``; return what the test checks.

    With ``evaluate_megabytes``, validate and predict take a model of that size instead: a large
    case's size is in its fit (the model out, its weights home), and validate and predict send the
    model the same way, so they need not carry the large size again (the suite's time)."""
    model = BigModel(megabytes)
    home_before = state_digest(model)
    run = trainer(strategy)
    run.fit(model, train_dataloaders=loader(extra_megabytes=data_megabytes))
    digest = next(c for c in run.callbacks if isinstance(c, StateDigest)).digest
    evaluated = model if evaluate_megabytes is None else BigModel(evaluate_megabytes)
    validated = run.validate(evaluated, dataloaders=loader())
    predictions = run.predict(evaluated, dataloaders=loader())
    return {"before": home_before, "rank0": digest, "home": state_digest(model), "validated": validated,
            "predictions": predictions, "model": model}
