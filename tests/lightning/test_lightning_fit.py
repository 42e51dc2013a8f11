"""RemoteStrategy.fit on the embedded cluster: the home Trainer ends as rank 0's did."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel, RecordRanks, load_record

pytestmark = pytest.mark.usefixtures("local_cluster")


def make_trainer(tmp_path, strategy="remote_gpu", callbacks=(), **kwargs):
    options = dict(accelerator="cpu", devices=2, max_epochs=2, logger=False, enable_checkpointing=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    options.update(kwargs)
    return L.Trainer(strategy=strategy, callbacks=[RecordRanks(str(tmp_path)), *callbacks], **options)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fit")
    L.seed_everything(7)
    model = DigitsModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    trainer = make_trainer(tmp_path, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(model, datamodule=DigitsData())
    return trainer, model, before, tmp_path


def test_workers_are_separate_processes_one_per_rank(fitted):
    _, _, _, folder = fitted
    records = [load_record(folder, "fit", rank) for rank in (0, 1)]
    assert [r["global_rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 for r in records)
    assert records[0]["pid"] != records[1]["pid"]
    assert records[0]["strategy_model"] == "DistributedDataParallel"


def test_distributed_sampler_ranks_replicas_and_shuffle(fitted):
    _, _, _, folder = fitted
    for rank in (0, 1):
        record = load_record(folder, "fit", rank)
        assert record["train_sampler"] == ("DistributedSampler", 2, rank, True)
        assert record["val_sampler"] == ("DistributedSampler", 2, rank, False)


def test_local_weights_equal_rank0_final_weights(fitted):
    trainer, model, before, folder = fitted
    rank0 = load_record(folder, "fit", 0)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not move local weights"
    for key, value in rank0["state_dict"].items():
        assert torch.equal(after[key], value), key


def test_trainer_state_and_metrics_equal_rank0(fitted):
    trainer, _, _, folder = fitted
    rank0 = load_record(folder, "fit", 0)
    assert trainer.state.finished and trainer.state.fn == "fit"
    assert trainer.current_epoch == rank0["current_epoch"] == 2
    assert trainer.global_step == rank0["global_step"] > 0
    assert set(trainer.callback_metrics) == set(rank0["callback_metrics"])
    assert {"train_loss_step", "train_loss_epoch", "val_loss"} <= set(trainer.logged_metrics)
    assert set(trainer.logged_metrics) == set(rank0["logged_metrics"])
    for key, value in rank0["logged_metrics"].items():
        assert isinstance(trainer.logged_metrics[key], torch.Tensor)
        assert torch.equal(trainer.logged_metrics[key], value), key
    for key, value in rank0["callback_metrics"].items():
        assert torch.equal(trainer.callback_metrics[key], value), key


def test_best_checkpoint_comes_home_and_loads(fitted):
    trainer, model, _, folder = fitted
    rank0 = load_record(folder, "fit", 0)
    callback = trainer.checkpoint_callback
    assert callback.best_model_path == rank0["best_model_path"] != ""
    assert torch.equal(callback.best_model_score, rank0["best_model_score"])
    restored = DigitsModel.load_from_checkpoint(callback.best_model_path)
    assert set(restored.state_dict()) == set(model.state_dict())


def test_validate_and_test_return_what_they_return_locally(fitted, tmp_path):
    trainer, model, _, _ = fitted
    data = DigitsData()
    validated = trainer.validate(model, datamodule=data, verbose=False)
    tested = trainer.test(model, datamodule=data, verbose=False)
    assert isinstance(validated, list) and set(validated[0]) == {"val_loss", "val_acc"}
    assert isinstance(tested, list) and set(tested[0]) == {"test_acc"}
    assert tested[0]["test_acc"] > 0.5
    local = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    expected = local.test(model, datamodule=data, verbose=False)
    assert tested[0]["test_acc"] == pytest.approx(expected[0]["test_acc"], abs=1e-6)
    assert trainer.state.fn == "test" and trainer.state.finished


def test_early_stopping_stops_after_patience_plus_one_epochs(tmp_path):
    model = DigitsModel(lr=0.0)  # val_loss never improves after the first epoch
    trainer = make_trainer(tmp_path, callbacks=[EarlyStopping(monitor="val_loss", patience=2)], max_epochs=10)
    trainer.fit(model, datamodule=DigitsData(limit=200))
    assert trainer.current_epoch == 3
    early = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
    assert early.stopped_epoch == 2 and early.wait_count == 2


def test_ddp_kwargs_reach_the_workers(tmp_path):
    strategy = RemoteStrategy(find_unused_parameters=True)
    trainer = make_trainer(tmp_path, strategy=strategy, max_epochs=1)
    trainer.fit(DigitsModel(unused_layer=True), datamodule=DigitsData(limit=200))
    assert load_record(tmp_path, "fit", 0)["find_unused_parameters"] is True
    assert load_record(tmp_path, "fit", 1)["find_unused_parameters"] is True


class RecordDDPSync(L.Callback):
    """On the worker: whether its DDP wrapper broadcasts the state (plain attributes come home)."""

    def on_train_start(self, trainer, pl_module) -> None:
        kwargs = trainer.strategy._ddp_kwargs
        self.init_sync = kwargs.get("init_sync", True)
        self.forward_sync_buffers = bool(trainer.strategy.model.forward_sync_buffers)


@pytest.mark.parametrize("num_workers, user_kwargs, expected", [
    (1, {}, (False, False)),  # nobody to broadcast to: the whole state would be copied for nothing
    (1, {"init_sync": True, "broadcast_buffers": True}, (True, True)),  # the user's explicit choice wins
    (2, {}, (True, True)),  # several ranks keep DDP's own broadcasts
])
def test_a_one_worker_run_skips_ddps_broadcasts_of_the_state(tmp_path, num_workers, user_kwargs, expected):
    from tests.lightning_project import big_models

    record = RecordDDPSync()
    trainer = big_models.trainer(RemoteStrategy(num_workers=num_workers, **user_kwargs), callbacks=[record],
                                 devices=num_workers)
    trainer.fit(big_models.BigModel(0.01), train_dataloaders=big_models.loader())
    assert (record.init_sync, record.forward_sync_buffers) == expected


def test_seeded_runs_are_identical_and_fit_twice_on_one_trainer(tmp_path):
    weights = []
    for _ in range(2):
        L.seed_everything(123)
        model = DigitsModel()
        trainer = make_trainer(tmp_path, max_epochs=1)
        trainer.fit(model, datamodule=DigitsData(limit=200))
        weights.append(model.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, datamodule=DigitsData(limit=200))  # the same Trainer, a second time
    assert trainer.current_epoch == 2 and trainer.state.finished


def test_dataloader_worker_processes_do_not_hang_test(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=1)
    result = trainer.test(DigitsModel(), datamodule=DigitsData(limit=200, num_workers=2), verbose=False)
    assert "test_acc" in result[0]
