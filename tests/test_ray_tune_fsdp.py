"""Ray Tune with a sharded Lightning trial: an FSDP fit (2 workers, CPU, gloo) inside a Tune trial,
reported and checkpointed by gpu_proxy_lightning.tune.TuneReportCallback (docs/sweeps.md)."""
from __future__ import annotations

import lightning as L
import torch
from ray import tune

from gpu_proxy_lightning import RemoteStrategy, read_full_checkpoint
from gpu_proxy_lightning.tune import TuneReportCallback, checkpoint_path, trial_resources
from tests.lightning_project.sharded_models import SmallNet, loader

EPOCHS = 2


def train_sharded(config: dict) -> None:
    L.seed_everything(7)
    model = SmallNet()
    trainer = L.Trainer(
        strategy=RemoteStrategy(num_workers=2, sharding="fsdp", state_dict_type="sharded",
                                resources_per_worker={"CPU": 0.5}),
        accelerator="cpu", devices=2, max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        callbacks=[TuneReportCallback(metrics=["val_loss"])])
    trainer.fit(model, train_dataloaders=loader(), val_dataloaders=loader(16, 16), ckpt_path=checkpoint_path())
    torch.save({"state_dict": model.state_dict(), "val_loss": trainer.callback_metrics["val_loss"].item()},
               f"{config['folder']}/final.pt")


def test_an_fsdp_trial_reports_to_tune_and_its_sharded_checkpoint_holds_the_model_it_ended_with(local_cluster, tmp_path):
    results = tune.Tuner(
        tune.with_resources(train_sharded, trial_resources(num_workers=2, cpus_per_worker=0.5, trainable_cpus=0.5)),
        param_space={"folder": str(tmp_path)},
        run_config=tune.RunConfig(name="tune-fsdp-test", storage_path=str(tmp_path / "storage"), verbose=0),
    ).fit()
    [result] = results
    assert result.error is None, result.error
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert result.metrics["training_iteration"] == EPOCHS and result.metrics["val_loss"] == final["val_loss"]
    # Tune kept the checkpoint of the last report: the shards of every rank, joined here into the model
    # the fit brought home (nothing trains after the last validation).
    checkpoint = read_full_checkpoint(checkpoint_path(result.checkpoint))
    assert checkpoint["epoch"] == EPOCHS - 1 and checkpoint["state_dict"].keys() == final["state_dict"].keys()
    for key, value in final["state_dict"].items():
        assert torch.equal(checkpoint["state_dict"][key], value), key
