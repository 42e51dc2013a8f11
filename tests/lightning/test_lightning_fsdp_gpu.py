"""Sharded runs on GPUs: NCCL, bf16-mixed, and FSDP's per-rank parameter memory against DDP's.

Needs a machine with at least two CUDA GPUs (NCCL puts each rank on its own device); skipped
elsewhere. The CPU tests of the same paths are in tests/lightning/test_lightning_fsdp.py.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.sharded_models import LossHistory, loader

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs (NCCL: one device per rank)"),
    pytest.mark.usefixtures("local_cluster"),
]
WIDTH, LAYERS = 2048, 12  # 12 x 2048 x 2048 fp32: about 200 MB of parameters


class Wide(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, WIDTH)
        self.blocks = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
        self.out = nn.Linear(WIDTH, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.out(self.blocks(self.inp(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RecordGPU(Callback):
    """Rank 0's parameter memory once set up, its backend and its autocast dtype (plain values come home)."""

    def __init__(self) -> None:
        self.parameter_bytes = 0
        self.backend = ""
        self.autocast = ""

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.parameter_bytes = torch.cuda.memory_allocated(pl_module.device)
            self.backend = torch.distributed.get_backend()
            self.autocast = str(getattr(trainer.precision_plugin, "mixed_precision_config", None)
                                and trainer.precision_plugin.mixed_precision_config.param_dtype)


def fit(strategy) -> RecordGPU:
    record = RecordGPU()
    trainer = L.Trainer(strategy=strategy, accelerator="gpu", devices=2, precision="bf16-mixed", max_epochs=1,
                        limit_train_batches=4, logger=False, enable_checkpointing=False,
                        callbacks=[record, LossHistory()],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Wide(), train_dataloaders=loader())
    assert trainer.state.finished
    return record


def test_fsdp_on_nccl_in_bf16_holds_a_world_size_share_of_ddps_parameter_memory():
    ddp = fit(RemoteStrategy(use_gpu=True))
    fsdp = fit(RemoteStrategy(use_gpu=True, sharding="fsdp", auto_wrap_policy={nn.Linear}))
    assert ddp.backend == fsdp.backend == "nccl"
    assert fsdp.autocast == "torch.bfloat16"
    assert fsdp.parameter_bytes <= ddp.parameter_bytes / 2 * 1.10, (fsdp.parameter_bytes, ddp.parameter_bytes)
