"""Sharded runs (``RemoteStrategy(sharding=...)``) on real Ray workers, CPU and gloo.

FSDP trains as DDP does (same losses, same weights), its sharded checkpoints commit on S3 as one
checkpoint each and resume after a worker is killed, a model built in ``configure_model`` comes home
equal to its consolidated checkpoint, and weights stay on the cluster when asked to.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy import ConfigurationError
from gpu_proxy.storage import list_committed
from gpu_proxy_lightning import RemoteStrategy, consolidate_checkpoint, read_full_checkpoint
from gpu_proxy_lightning.sharded_checkpoints import SHARDS_DIR
from tests.lightning_project.sharded_models import (BuiltOnWorkers, KillAt, LossHistory, RecordStarts, ShardedByHand,
                                                    SmallNet, loader)
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.usefixtures("local_cluster")


def trainer_for(strategy, max_epochs: int = 1, checkpoint: ModelCheckpoint | None = None, callbacks=()) -> L.Trainer:
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=max_epochs, logger=False,
                     enable_checkpointing=checkpoint is not None, callbacks=[LossHistory(), *callbacks,
                                                                             *([checkpoint] if checkpoint else [])],
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=1)


def losses(trainer: L.Trainer) -> list[float]:
    return next(c for c in trainer.callbacks if isinstance(c, LossHistory)).losses


def test_a_2_worker_fsdp_fit_matches_ddp_of_the_same_seed():
    results = {}
    for name, strategy in [("ddp", RemoteStrategy()), ("fsdp", RemoteStrategy(sharding="fsdp", return_weights=True))]:
        L.seed_everything(7)
        model = SmallNet()
        trainer = trainer_for(strategy, max_epochs=2)
        trainer.fit(model, train_dataloaders=loader())
        results[name] = (losses(trainer), model.state_dict(), trainer.global_step)
    (ddp_losses, ddp_weights, ddp_steps), (fsdp_losses, fsdp_weights, fsdp_steps) = results["ddp"], results["fsdp"]
    assert fsdp_steps == ddp_steps == 8 and len(fsdp_losses) == 8
    assert fsdp_losses[-1] < fsdp_losses[0]  # it trained
    assert torch.allclose(torch.tensor(fsdp_losses), torch.tensor(ddp_losses), atol=1e-4)
    assert fsdp_weights.keys() == ddp_weights.keys()
    for key, value in ddp_weights.items():
        assert torch.allclose(fsdp_weights[key], value, atol=1e-4), key
