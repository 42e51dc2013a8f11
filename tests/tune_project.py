"""A tiny Ray Tune trainable whose trials are remote Lightning fits (tests/lightning/test_ray_tune.py).

A linear regression trained with SGD, one validation batch, so the value the module computes is the
value Lightning logs. Each trial notes in ``<folder>/<trial id>.jsonl``: the trainable's placement
group (``trainable``); from the worker, its placement group and the step each attempt starts at
(``worker``), and each epoch's ``val_loss`` (``val``). ``fail=True`` raises in every attempt's second epoch.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning as L
import ray
import torch
from ray import tune
from ray.util.placement_group import get_current_placement_group, placement_group_table
from torch import nn

from gpu_proxy_lightning import RemoteStrategy
from gpu_proxy_lightning.tune import TuneReportCallback, checkpoint_path, trial_resources
from tests.sweep_project import BATCHES_PER_EPOCH, loaders  # noqa: F401  (the Optuna sweep's data)

MAX_EPOCHS = 4
CPUS_PER_WORKER = 0.5
CASES = [  # in this order; with 2 trials at a time, the third starts after another finished
    {"lr": 0.1, "fail": False}, {"lr": 0.2, "fail": False},
    {"lr": 1e-4, "fail": False, "step_s": 0.1},  # ASHA stops it at its first rung; slow, so it stops mid-run
    {"lr": 0.2, "fail": True},  # as good as the best at epoch 0, then fails in epoch 1; restored, fails again
]


def note(folder: str, trial: str, **entry) -> None:
    with open(Path(folder) / f"{trial}.jsonl", "a") as out:
        out.write(json.dumps(entry) + "\n")


class Regressor(L.LightningModule):
    def __init__(self, lr: float, fail: bool = False, folder: str = "", trial: str = "", step_s: float = 0.0) -> None:
        super().__init__()
        self.lr, self.fail, self.folder, self.trial, self.step_s = lr, fail, folder, trial, step_s
        self.net = nn.Linear(8, 1)

    def on_train_start(self) -> None:  # after a checkpoint was restored
        note(self.folder, self.trial, kind="worker", step=self.global_step,
             pg=ray.get_runtime_context().get_placement_group_id())

    def training_step(self, batch, batch_idx):
        if self.fail and self.current_epoch == 1 and batch_idx == 3:
            raise RuntimeError("this trial fails on purpose")
        time.sleep(self.step_s)
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            note(self.folder, self.trial, kind="val", epoch=self.current_epoch, val_loss=loss.item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def train(config: dict) -> None:
    trial = tune.get_context().get_trial_id()
    pg = get_current_placement_group()
    note(config["folder"], trial, kind="trainable", pg=pg.id.hex(), bundles=placement_group_table(pg)["bundles"])
    torch.manual_seed(0)  # every trial starts from the same weights
    trainer = L.Trainer(
        strategy=RemoteStrategy(num_workers=1, resources_per_worker={"CPU": CPUS_PER_WORKER}), accelerator="cpu",
        max_epochs=MAX_EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[TuneReportCallback(metrics={"val_loss": "val_loss"})])
    model = Regressor(config["lr"], config["fail"], config["folder"], trial, config["step_s"])
    trainer.fit(model, *loaders(), ckpt_path=checkpoint_path())


def tuner(folder: str, storage: str, cases: list[dict] = CASES, max_failures: int = 1) -> tune.Tuner:
    from ray.tune.schedulers import ASHAScheduler

    return tune.Tuner(
        tune.with_resources(train, trial_resources(num_workers=1, cpus_per_worker=CPUS_PER_WORKER,
                                                   trainable_cpus=0.5)),
        param_space={"case": tune.grid_search(list(range(len(cases)))), "folder": folder,
                     "lr": tune.sample_from(lambda config: cases[config["case"]]["lr"]),
                     "fail": tune.sample_from(lambda config: cases[config["case"]]["fail"]),
                     "step_s": tune.sample_from(lambda config: cases[config["case"]].get("step_s", 0.0))},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", max_concurrent_trials=2,
                                    scheduler=ASHAScheduler(max_t=MAX_EPOCHS, grace_period=1, reduction_factor=2)),
        run_config=tune.RunConfig(name="tune-test", storage_path=storage, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )


if __name__ == "__main__":  # python -m tests.tune_project FOLDER STORAGE: a sweep as a Ray Job's driver
    ray.init()
    results = tuner(sys.argv[1], sys.argv[2], cases=CASES[:2], max_failures=0).fit()
    print(json.dumps({"trials": [{"val_loss": r.metrics.get("val_loss"), "error": bool(r.error),
                                  "trial_id": r.metrics.get("trial_id"),
                                  "iteration": r.metrics.get("training_iteration")} for r in results]}))
