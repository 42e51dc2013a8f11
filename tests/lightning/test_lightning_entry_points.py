"""Every way a user names the strategy: the instance, the string, LightningCLI, both Lightning packages,
and user code that lives in the script itself (``__main__``)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import gpu_proxy_lightning  # noqa: F401

pytestmark = pytest.mark.usefixtures("local_cluster")


def test_string_is_registered_in_both_lightning_packages():
    from lightning.pytorch.strategies import StrategyRegistry
    from pytorch_lightning.strategies import StrategyRegistry as PLStrategyRegistry

    assert "remote_gpu" in StrategyRegistry and "remote_gpu" in PLStrategyRegistry


def test_pytorch_lightning_users_train_remotely():
    import pytorch_lightning as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from tests.lightning_project.models import digits_tensors

    class PLModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.layer(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = digits_tensors(128)
    model = PLModel()
    before = model.layer.weight.detach().clone()
    trainer = pl.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert type(trainer.strategy).__module__ == "gpu_proxy_lightning.pl.strategy"
    assert trainer.state.finished and trainer.global_step == 4
    assert not torch.equal(before, model.layer.weight)


def test_lightning_cli_class_path(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from tests.lightning_project.models import DigitsData, DigitsModel

    cli = LightningCLI(DigitsModel, DigitsData, run=True, save_config_callback=None, args=[
        "fit", "--trainer.strategy=gpu_proxy_lightning.RemoteStrategy",
        "--trainer.strategy.num_workers=2", "--trainer.accelerator=cpu", "--trainer.max_epochs=1",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--data.limit=200",
        f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.strategy.worker_count() == 2
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 1


SCRIPT = textwrap.dedent('''
    import lightning as L, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import gpu_proxy_lightning

    class ScriptModel(L.LightningModule):  # defined in __main__: travels by value
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.layer(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    if __name__ == "__main__":
        torch.manual_seed(0)
        x = torch.randn(64, 4); y = x.sum(1, keepdim=True)
        model = ScriptModel()
        trainer = L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=3,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
        print("RESULT", trainer.global_step, trainer.state.finished)
''')


def test_module_defined_in_the_users_main_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT 12 True" in done.stdout
