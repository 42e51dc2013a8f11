"""A home callback that stops a remote Lightning fit: ``fit`` ends as a local fit stopped the same way.

``trainer.should_stop`` set at home: ``fit`` returns, the model holds the trained-so-far weights.
``optuna.TrialPruned`` raised at home: ``fit`` raises it once the run has stopped and its workers
were freed, the model holding the trained-so-far weights (as a local model holds them).
"""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerStatus
from optuna_integration import PyTorchLightningPruningCallback
from torch.utils.data import DataLoader, DistributedSampler

from gpu_proxy.clusters.base import all_active_runs
from gpu_proxy.runs.pool import current_pool
from gpu_proxy_lightning.home_callbacks import HomeCallback
from tests import sweep_project
from tests.sweep_project import BATCHES_PER_EPOCH, MAX_EPOCHS, Regressor, loaders, make_trainer

pytestmark = [pytest.mark.timeout(240)]
optuna.logging.set_verbosity(optuna.logging.WARNING)


class StopAfterFirstEpoch(Callback):
    """Runs at home: what EarlyStopping does when it decides, after epoch 0."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module):
        self.validations = getattr(self, "validations", 0) + 1


def _model(lr: float, note: Path) -> tuple[Regressor, dict]:
    torch.manual_seed(0)
    model = Regressor(lr, fail=False, note=str(note))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _check_trained_so_far(model: Regressor, initial: dict, steps: int, note: Path) -> None:
    """The home model holds the weights of the step where the run stopped: those of a local twin
    trained that many steps from the same start."""
    assert steps == int(note.read_text()) + 1  # the worker's last step, as home's trainer counts it
    assert BATCHES_PER_EPOCH < steps < BATCHES_PER_EPOCH * MAX_EPOCHS  # stopped mid-run, after epoch 0
    twin = Regressor(model.lr, fail=False, note=str(note) + ".twin")
    twin.load_state_dict(initial)
    train, val = loaders()
    # The batches in the order Lightning's DDP gives them to the one remote rank (it shuffles with seed 0).
    order = DistributedSampler(train.dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    twin_train = DataLoader(train.dataset, batch_size=train.batch_size, sampler=order)
    make_trainer(None, [], remote=False, max_steps=steps, use_distributed_sampler=False).fit(twin, twin_train, val)
    for name, expected in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], expected)


def _busy_groups() -> list[dict]:
    return [group for group in current_pool().describe() if group["state"] == "busy"]


def test_should_stop_set_by_a_home_callback_ends_fit_normally_with_the_weights_so_far(local_cluster, tmp_path):
    note = tmp_path / "step"
    model, initial = _model(0.1, note)
    stopper = StopAfterFirstEpoch()
    trainer = make_trainer(local_cluster, [HomeCallback(stopper)])
    trainer.fit(model, *loaders())  # returns, as a local fit that trainer.should_stop ended
    assert trainer.state.status == TrainerStatus.FINISHED and not trainer.interrupted and trainer.should_stop
    _check_trained_so_far(model, initial, trainer.global_step, note)
    # The home callback is still there for the Trainer's next call (rank 0's shell, whose wrapped
    # callback is None, must not be copied onto it when the run's state comes home).
    assert [c.callback for c in trainer.callbacks if isinstance(c, HomeCallback)] == [stopper]
    validations = stopper.validations
    trainer.validate(model, loaders()[1])
    assert stopper.validations == validations + 1


def test_trial_pruned_at_home_is_raised_after_the_run_stopped_and_freed_its_workers(local_cluster, tmp_path):
    note = tmp_path / "step"
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=sweep_project.PRUNE_ABOVE))
    trial = study.ask()
    model, initial = _model(1e-4, note)  # val_loss ~5 after epoch 0: pruned there
    trainer = make_trainer(local_cluster, [HomeCallback(PyTorchLightningPruningCallback(trial, monitor="val_loss"))])
    with pytest.raises(optuna.TrialPruned):
        trainer.fit(model, *loaders())
    assert all_active_runs() == [] and _busy_groups() == []  # the run ended and gave its workers back
    assert list(study.trials[0].intermediate_values) == [0]
    _check_trained_so_far(model, initial, trainer.global_step, note)
