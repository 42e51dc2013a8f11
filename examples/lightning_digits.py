"""Train an MLP on scikit-learn's bundled digits data with 2 DDP workers on the embedded Ray cluster.

    python examples/lightning_digits.py

Nothing is downloaded; the only change from local training is ``strategy="remote_gpu"``.
"""
import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gpu_proxy_lightning  # noqa: F401  (registers strategy="remote_gpu")


class DigitsClassifier(L.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class DigitsData(L.LightningDataModule):
    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        digits = load_digits()
        x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target, dtype=torch.long)
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(x), generator=generator)
        train, val = order[:1500], order[1500:]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


def main() -> None:
    L.seed_everything(0)
    model, data = DigitsClassifier(), DigitsData()
    trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=10,
                        logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    accuracy = trainer.callback_metrics["val_acc"].item()
    print(f"final validation accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
