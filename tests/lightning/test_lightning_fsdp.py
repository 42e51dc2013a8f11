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
from gpu_proxy_lightning import (RemoteStrategy, consolidate_checkpoint, consolidate_on_cluster, read_full_checkpoint,
                                 sharding)
from gpu_proxy_lightning.sharded_checkpoints import SHARDS_DIR
from tests.lightning_project.sharded_models import (BuiltOnWorkers, KillAt, KillWhileCommitting, LossHistory,
                                                    RecordPrecision, RecordStarts, ShardedByHand, SmallNet, loader)
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


def fit_seeded(strategy, model_class=SmallNet, checkpoint=None) -> tuple[L.Trainer, L.LightningModule]:
    L.seed_everything(7)
    model = model_class()
    trainer = trainer_for(strategy, max_epochs=2, checkpoint=checkpoint)
    trainer.fit(model, train_dataloaders=loader())
    return trainer, model


@pytest.fixture(scope="module")
def ddp_reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """A 2-worker DDP fit of the seed every sharded fit here uses: its losses and final weights."""
    trainer, model = fit_seeded(RemoteStrategy())
    assert trainer.global_step == 8 and losses(trainer)[-1] < losses(trainer)[0]  # it trained
    return losses(trainer), model.state_dict()


def assert_matches_ddp(trainer: L.Trainer, weights: dict[str, torch.Tensor], ddp_reference) -> None:
    ddp_losses, ddp_weights = ddp_reference
    assert trainer.global_step == 8
    assert torch.allclose(torch.tensor(losses(trainer)), torch.tensor(ddp_losses), atol=1e-4)
    assert weights.keys() == ddp_weights.keys()
    for key, value in ddp_weights.items():
        assert torch.allclose(weights[key], value, atol=1e-4), key


def test_a_2_worker_fsdp_fit_matches_ddp_of_the_same_seed(ddp_reference):
    trainer, model = fit_seeded(RemoteStrategy(sharding="fsdp", return_weights=True))
    assert_matches_ddp(trainer, model.state_dict(), ddp_reference)
    (validated,) = trainer.validate(model, dataloaders=loader())  # the weights that came home, sharded again
    assert validated["val_loss"] < losses(trainer)[0]


def test_a_sharded_checkpoint_on_s3_commits_as_one_and_resumes_after_a_worker_is_killed(s3_bucket, tmp_path):
    url, options = f"s3://{s3_bucket.name}/runs", s3_bucket.endpoint.storage_options
    starts = tmp_path / "starts"
    strategy = RemoteStrategy(sharding="fsdp", state_dict_type="sharded", checkpoint_dir=url, storage_options=options,
                              run_name="sharded", max_failures=1)
    # 64 samples / 2 ranks / 8 = 4 steps an epoch; rank 1 dies in the third epoch, after two commits
    trainer = trainer_for(strategy, max_epochs=4, checkpoint=ModelCheckpoint(save_top_k=-1, save_last=True),
                          callbacks=[KillAt(rank=1, at_step=10, marker=str(tmp_path / "killed")),
                                     RecordStarts(str(starts))])
    L.seed_everything(7)
    model = SmallNet()
    trainer.fit(model, train_dataloaders=loader())
    assert (tmp_path / "killed").exists()
    assert starts.read_text().split() == ["0", "8"], "the second attempt resumed from the epoch-2 checkpoint"
    assert trainer.state.finished and trainer.current_epoch == 4 and trainer.global_step == 16
    L.seed_everything(7)
    uninterrupted = SmallNet()
    trainer_for(RemoteStrategy(sharding="fsdp"), max_epochs=4).fit(uninterrupted, train_dataloaders=loader())
    for key, value in uninterrupted.state_dict().items():  # the weights' and Adam's shards were restored
        assert torch.allclose(model.state_dict()[key], value, atol=1e-5), key

    checkpoints = f"{url}/sharded/checkpoints"
    committed = {c.rsplit("/", 1)[1] for c in list_committed(checkpoints, options)}
    assert committed == {f"epoch={e}-step={4 * (e + 1)}.ckpt" for e in range(4)} | {"last.ckpt"}
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    folders = {p.rsplit("/", 1)[1] for p in fs.ls(f"{checkpoints.removeprefix('s3://')}/{SHARDS_DIR}")}
    assert {f.rsplit(".", 1)[0] for f in folders} == committed and len(folders) == len(committed), \
        "one shard folder per committed checkpoint: older versions of last.ckpt were removed"
    last = read_full_checkpoint(f"{checkpoints}/last.ckpt", options)
    assert last["global_step"] == 16 and set(last["state_dict"]) == set(SmallNet().state_dict())
    assert last["optimizer_states"][0]["state"], "Adam's state was saved"


def test_a_model_built_in_configure_model_comes_home_equal_to_its_consolidated_checkpoint(tmp_path):
    model = BuiltOnWorkers()
    assert list(model.parameters()) == []  # home never built it
    strategy = RemoteStrategy(sharding="fsdp", state_dict_type="sharded", checkpoint_dir=f"file://{tmp_path}",
                              run_name="built", return_weights=True)
    trainer = trainer_for(strategy, max_epochs=1, checkpoint=ModelCheckpoint(save_last=True))
    trainer.fit(model, train_dataloaders=loader())

    full_url = consolidate_checkpoint(trainer.checkpoint_callback.last_model_path)
    assert full_url.endswith("last.full.ckpt")
    consolidated = BuiltOnWorkers.load_from_checkpoint(full_url)  # a plain Lightning checkpoint
    home = model.state_dict()
    assert home.keys() == consolidated.state_dict().keys() and len(home) == 6
    for key, value in consolidated.state_dict().items():
        assert home[key].device.type == "cpu" and torch.equal(home[key], value), key

    on_cluster = consolidate_on_cluster(trainer.checkpoint_callback.last_model_path,
                                        output_url=f"file://{tmp_path}/consolidated.ckpt")
    assert on_cluster == f"file://{tmp_path}/consolidated.ckpt"
    for key, value in torch.load(tmp_path / "consolidated.ckpt", weights_only=False)["state_dict"].items():
        assert torch.equal(home[key], value), key


@pytest.mark.parametrize("return_weights", [False, "auto"])
def test_weights_stay_on_the_cluster_when_asked_and_the_checkpoint_names_them(tmp_path, monkeypatch, return_weights):
    if return_weights == "auto":  # "auto" with home's free memory (measured) counting as a few bytes
        monkeypatch.setattr(sharding, "HOME_MEMORY_SHARE", 1e-9)
    strategy = RemoteStrategy(sharding="fsdp", checkpoint_dir=f"file://{tmp_path}", run_name="stays",
                              return_weights=return_weights)
    trainer = trainer_for(strategy, max_epochs=1, checkpoint=ModelCheckpoint(save_last=True))
    with trainer.init_module(empty_init=True):
        model = SmallNet()
    assert all(p.is_meta for p in model.parameters())  # home holds no weights: the model ships as its recipe
    trainer.fit(model, train_dataloaders=loader())
    assert all(p.is_meta for p in model.parameters()), "nothing came home"
    assert strategy.weights_url == trainer.checkpoint_callback.last_model_path
    restored = SmallNet.load_from_checkpoint(strategy.weights_url)  # state_dict_type="full": one plain file
    assert set(restored.state_dict()) == {k for k, _ in model.named_parameters()}
    assert not any(t.is_meta for t in restored.state_dict().values())


def test_a_worker_killed_between_writing_shards_and_committing_leaves_the_last_good_checkpoint(tmp_path):
    starts = tmp_path / "starts"
    strategy = RemoteStrategy(sharding="fsdp", state_dict_type="sharded", checkpoint_dir=f"file://{tmp_path}/runs",
                              run_name="crash", max_failures=1)
    trainer = trainer_for(strategy, max_epochs=3, checkpoint=ModelCheckpoint(save_top_k=-1),
                          callbacks=[KillWhileCommitting(str(tmp_path / "killed")), RecordStarts(str(starts))])
    trainer.fit(SmallNet(), train_dataloaders=loader())
    assert (tmp_path / "killed").exists()
    # The epoch-1 save died after its shards were written: epoch 0's checkpoint stayed the newest, and resumed.
    assert starts.read_text().split() == ["0", "4"]
    assert trainer.global_step == 12
    checkpoints = f"{tmp_path}/runs/crash/checkpoints"
    names = [f"epoch={e}-step={4 * (e + 1)}.ckpt" for e in range(3)]
    assert [c.rsplit("/", 1)[1] for c in list_committed(checkpoints)] == names
    assert read_full_checkpoint(f"{checkpoints}/{names[1]}")["global_step"] == 8  # saved again, after the restart
    shard_folders = list((tmp_path / "runs" / "crash" / "checkpoints" / SHARDS_DIR).iterdir())
    assert len(shard_folders) == 3, "the dead save's shards were removed when its name was saved again"


@pytest.mark.parametrize("arguments, named", [
    (dict(sharding="fsdb"), "sharding='fsdb'"),
    (dict(sharding="fsdp", auto_wrap_polcy={torch.nn.Linear}), "auto_wrap_polcy"),
    (dict(sharding="fsdp", state_dict_type="shards"), "state_dict_type='shards'"),
    (dict(sharding="fsdp", sharding_strategy="FULLY"), "sharding_strategy='FULLY'"),
    (dict(sharding="model_parallel", tensor_parallel_size="two", no_such=1), "no_such"),
    (dict(return_weights="yes"), "return_weights='yes'"),
    (dict(state_dict_type="sharded"), 'add sharding="fsdp"'),
])
def test_bad_sharding_arguments_fail_in_the_constructor_naming_the_value(arguments, named):
    with pytest.raises(ConfigurationError) as info:
        RemoteStrategy(**arguments)
    assert named in str(info.value)


def test_deepspeed_without_the_package_says_how_to_install_it():
    from lightning.fabric.strategies.deepspeed import _DEEPSPEED_AVAILABLE

    if _DEEPSPEED_AVAILABLE:
        pytest.skip("deepspeed is installed here")
    with pytest.raises(ConfigurationError, match="pip install deepspeed"):
        RemoteStrategy(sharding="deepspeed", stage=3)


def test_model_parallel_with_fully_shard_in_configure_model_matches_ddp_and_checkpoints_sharded(tmp_path,
                                                                                               ddp_reference):
    strategy = RemoteStrategy(sharding="model_parallel", data_parallel_size=2, tensor_parallel_size=1,
                              checkpoint_dir=f"file://{tmp_path}", run_name="mp", return_weights=True)
    trainer, model = fit_seeded(strategy, ShardedByHand, ModelCheckpoint())
    assert_matches_ddp(trainer, model.state_dict(), ddp_reference)
    consolidated = read_full_checkpoint(trainer.checkpoint_callback.best_model_path)  # sharded, by default
    assert consolidated["global_step"] == 8 and consolidated["optimizer_states"][0]["state"]
    for key, value in consolidated["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_large_models_example_in_the_docs_runs_as_written(tmp_path):
    from pathlib import Path
    import re

    docs = (Path(__file__).resolve().parents[2] / "docs" / "lightning.md").read_text()
    section = docs.split("## Large models", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {}
    exec(compile(example.replace("/tmp/gpu-proxy-runs", str(tmp_path)), "docs/lightning.md", "exec"), namespace)
    restored, model = namespace["restored"], namespace["model"]
    assert namespace["best"].startswith(str(tmp_path)) and len(restored.state_dict()) == 8
    for key, value in restored.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key  # "auto": they fit, so they came home


def test_the_trainers_precision_reaches_fsdp_on_the_workers():
    """bf16-mixed becomes FSDP's MixedPrecision there (the plugin Lightning picks for FSDP), not home's DDP one."""
    record = RecordPrecision()
    trainer = L.Trainer(strategy=RemoteStrategy(sharding="fsdp"), accelerator="cpu", devices=2, max_epochs=1,
                        precision="bf16-mixed", logger=False, enable_checkpointing=False, callbacks=[record],
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2)
    trainer.fit(SmallNet(), train_dataloaders=loader())
    assert record.seen == "FSDPPrecision/torch.bfloat16"


def test_the_remote_fsdp_strategy_name_is_remote_strategy_with_fsdp():
    trainer = L.Trainer(strategy="remote_fsdp", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, RemoteStrategy) and trainer.strategy.sharding == "fsdp"
    assert trainer.world_size == 2
