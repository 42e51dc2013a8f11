"""A tiny Optuna objective whose trials are remote Lightning fits (tests/lightning/test_optuna_sweep.py).

A linear regression trained with SGD: the learning rate decides how fast ``val_loss`` falls, so a
tiny rate is pruned after its first epoch by ``ThresholdPruner``; ``fail=True`` raises mid-run.
Each trial notes its last training step in ``<folder>/step<trial number>``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import optuna
import torch
from optuna_integration import PyTorchLightningPruningCallback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gpu_proxy_lightning import RemoteStrategy
from gpu_proxy_lightning.home_callbacks import HomeCallback

BATCHES_PER_EPOCH = 20
MAX_EPOCHS = 3
STEP_S = 0.02  # a step long enough that a stop request arrives mid-run
PRUNE_ABOVE = 1.0  # val_loss after one epoch: ~0.02 for a useful rate, ~5 for lr=1e-4

TRIALS = [  # enqueued in this order; trial 3 is pruned, trial 4 fails
    {"lr": 0.3, "fail": False}, {"lr": 0.1, "fail": False}, {"lr": 0.2, "fail": False},
    {"lr": 1e-4, "fail": False}, {"lr": 0.1, "fail": True}, {"lr": 0.15, "fail": False},
]


class Regressor(L.LightningModule):
    def __init__(self, lr: float, fail: bool, note: str) -> None:
        super().__init__()
        self.lr, self.fail, self.note = lr, fail, note
        self.net = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_S)
        Path(self.note).write_text(str(self.global_step))
        if self.fail and self.global_step == 3:
            raise RuntimeError("this trial fails on purpose")
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES_PER_EPOCH * 8 + 64, 8, generator=generator)
    y = x @ torch.arange(1.0, 9.0).unsqueeze(1) / 4
    train = TensorDataset(x[:-64], y[:-64])
    return DataLoader(train, batch_size=8), DataLoader(TensorDataset(x[-64:], y[-64:]), batch_size=64)


def make_trainer(cluster, callbacks: list, remote: bool = True, **options) -> L.Trainer:
    """The trials' Trainer (``remote=False``: the same one, local: a twin to compare with)."""
    settings = dict(accelerator="cpu", max_epochs=MAX_EPOCHS, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    if remote:
        settings["strategy"] = RemoteStrategy(cluster=cluster, num_workers=1)
    return L.Trainer(callbacks=callbacks, **{**settings, **options})


def make_objective(cluster, folder: str, can_fail: bool = True, max_epochs: int = MAX_EPOCHS):
    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        fail = trial.suggest_categorical("fail", [False, True] if can_fail else [False])
        trainer = make_trainer(cluster, [HomeCallback(PyTorchLightningPruningCallback(trial, monitor="val_loss"))],
                               max_epochs=max_epochs)
        trainer.fit(Regressor(lr, fail, f"{folder}/step{trial.number}"), *loaders())
        return trainer.callback_metrics["val_loss"].item()
    return objective


def new_study(storage=None, name: str = "sweep", load_if_exists: bool = False,
              trials: list[dict] = TRIALS) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=load_if_exists,
                                sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.ThresholdPruner(upper=PRUNE_ABOVE))
    if not study.trials:
        for params in trials:
            study.enqueue_trial(params)
    return study


def resume(cluster, url: str, folder: str, total: int) -> None:
    """Run the SQLite study at ``url`` up to ``total`` finished trials, after a home that was killed."""
    from gpu_proxy.sweeps import optimize

    # Sampled, not enqueued: two threads may pop the same enqueued trial from an RDB storage (seen here
    # as Optuna's "Cannot tell a COMPLETE trial"), which in-memory studies do not do.
    study = new_study(url, load_if_exists=True, trials=[])
    for left in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):  # a killed home's trials
        study.tell(left.number, state=optuna.trial.TrialState.FAIL)
    done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))
    print(f"resuming with {done} finished", flush=True)
    optimize(study, make_objective(cluster, folder, can_fail=False), n_trials=max(total - done, 1), n_concurrent=2)


if __name__ == "__main__":  # python -m tests.sweep_project CLUSTER SQLITE_URL FOLDER N_TRIALS
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    resume(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
