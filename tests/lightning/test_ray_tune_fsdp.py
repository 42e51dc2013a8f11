"""Ray Tune with a sharded Lightning trial: an FSDP fit (2 workers, CPU, gloo) inside a Tune trial,
reported and checkpointed by gpu_proxy_lightning.tune.TuneReportCallback, and restored by Tune from
its sharded checkpoint (docs/sweeps.md)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from ray import tune
from typing_extensions import override

from gpu_proxy_lightning import RemoteStrategy, read_full_checkpoint
from gpu_proxy_lightning.sharded_checkpoints import MANIFEST_KEY, SHARDS_DIR, is_manifest
from gpu_proxy_lightning.tune import TuneReportCallback, checkpoint_path, trial_resources
from tests.lightning_project.sharded_models import SmallNet, loader

EPOCHS = 2
STEPS_PER_EPOCH = 4  # loader(): 64 samples, 32 per rank, in batches of 8


class FailsInEpoch1(Callback):
    """On the workers: each attempt notes the step it starts at; the first one fails as epoch 1 starts."""

    def __init__(self, folder: str, fail: bool) -> None:
        self.folder, self.fail = folder, fail

    @override
    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            with open(f"{self.folder}/starts.txt", "a") as out:
                out.write(f"{trainer.global_step}\n")

    @override
    def on_train_epoch_start(self, trainer, pl_module):
        if self.fail and trainer.current_epoch == 1:
            raise RuntimeError("this attempt fails on purpose")


def train_sharded(config: dict) -> None:
    L.seed_everything(7)
    model = SmallNet()
    resume = checkpoint_path()  # None in the first attempt; the epoch-0 checkpoint in the restored one
    trainer = L.Trainer(
        strategy=RemoteStrategy(num_workers=2, sharding="fsdp", state_dict_type="sharded",
                                resources_per_worker={"CPU": 0.5}),
        accelerator="cpu", devices=2, max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        callbacks=[TuneReportCallback(metrics=["val_loss"]), FailsInEpoch1(config["folder"], fail=resume is None)])
    trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader(16, 16), ckpt_path=resume)
    torch.save({"state_dict": model.state_dict(), "val_loss": trainer.callback_metrics["val_loss"].item()},
               f"{config['folder']}/final.pt")


def test_an_fsdp_trial_reports_to_tune_and_its_sharded_checkpoint_holds_the_model_it_ended_with(local_cluster,
                                                                                                 tmp_path):
    results = tune.Tuner(
        tune.with_resources(train_sharded, trial_resources(num_workers=2, cpus_per_worker=0.5, trainable_cpus=0.5)),
        param_space={"folder": str(tmp_path)},
        run_config=tune.RunConfig(name="tune-fsdp-test", storage_path=str(tmp_path / "storage"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    ).fit()
    [result] = results
    assert result.error is None, result.error
    # The first attempt failed in epoch 1; Tune restored the trial from the sharded checkpoint of epoch 0,
    # which every rank loaded its shards of (the restored attempt started at epoch 0's last step).
    assert (tmp_path / "starts.txt").read_text().split() == ["0", str(STEPS_PER_EPOCH)]
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert result.metrics["training_iteration"] == EPOCHS and result.metrics["val_loss"] == final["val_loss"]
    # Tune kept the checkpoint of the last report: the shards of every rank, joined here into the model
    # the fit brought home (nothing trains after the last validation).
    manifest = torch.load(checkpoint_path(result.checkpoint), weights_only=False)
    assert is_manifest(manifest) and "state_dict" not in manifest  # sharded: the tensors are in the shards
    shards = Path(result.checkpoint.path) / SHARDS_DIR / manifest[MANIFEST_KEY]["folder"]
    assert len([f for f in shards.iterdir() if f.suffix == ".distcp"]) == 2, sorted(shards.iterdir())  # one per rank
    checkpoint = read_full_checkpoint(checkpoint_path(result.checkpoint))
    assert checkpoint["epoch"] == EPOCHS - 1 and checkpoint["state_dict"].keys() == final["state_dict"].keys()
    for key, value in final["state_dict"].items():
        assert torch.equal(checkpoint["state_dict"][key], value), key
