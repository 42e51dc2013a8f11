"""A Ray Tune sweep on a metered cluster (tests/lightning/test_ray_tune_cost.py): trials of the tiny
regressor of tests/tune_project.py, each with a ``ModelCheckpoint`` (the budget's stop saves
``interrupted.ckpt`` there) and the ``BudgetStopper``. A trial notes ``<folder>/<trial id>.jsonl``
(``trainable`` when it starts, ``val`` per epoch)."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from ray import tune

from gpu_proxy_lightning import RemoteStrategy
from gpu_proxy_lightning.tune import BudgetStopper, TuneReportCallback, checkpoint_path, trial_resources
from tests.sweep_project import loaders
from tests.tune_project import CPUS_PER_WORKER, Regressor, note

MAX_EPOCHS = 8
STEP_S = 0.05  # 20 batches an epoch: about a second


def train(config: dict) -> None:
    trial = tune.get_context().get_trial_id()
    note(config["folder"], trial, kind="trainable")
    torch.manual_seed(0)
    trainer = L.Trainer(
        strategy=RemoteStrategy(num_workers=1, resources_per_worker={"CPU": CPUS_PER_WORKER}), accelerator="cpu",
        max_epochs=MAX_EPOCHS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=f"{config['folder']}/{trial}", save_top_k=0),
                   TuneReportCallback(metrics="val_loss")])
    model = Regressor(config["lr"], False, config["folder"], trial, STEP_S)
    trainer.fit(model, *loaders(), ckpt_path=checkpoint_path())


def tuner(folder: str, storage: str, trials: int = 3) -> tune.Tuner:
    budget = BudgetStopper()
    return tune.Tuner(
        tune.with_resources(train, trial_resources(num_workers=1, cpus_per_worker=CPUS_PER_WORKER, trainable_cpus=0.5)),
        param_space={"lr": tune.grid_search([0.1 * (i + 1) for i in range(trials)]), "folder": folder},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", max_concurrent_trials=2),
        run_config=tune.RunConfig(name="tune-cost-test", storage_path=storage, verbose=0, stop=budget,
                                  callbacks=[budget]),
    )
