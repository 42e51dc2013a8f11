"""checkpoint_dir on any fsspec URL, checked before spending; automatic and manual resume."""
from __future__ import annotations

import time

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from ray.util.placement_group import placement_group_table

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy import WorkerLostError
from gpu_proxy.storage import StorageError, list_committed
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel, KillOnce
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401
from tests.lightning.test_lightning_live_events import TimedLogger

pytestmark = pytest.mark.usefixtures("local_cluster")


def trainer_for(strategy, max_epochs=2, callbacks=()):
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=max_epochs, logger=False,
                     callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=1, save_last=True), *callbacks],
                     enable_progress_bar=False, enable_model_summary=False)


def test_checkpoints_go_to_s3_and_the_best_loads_from_home(s3_bucket):
    url = f"s3://{s3_bucket.name}/runs"
    strategy = RemoteStrategy(checkpoint_dir=url, storage_options=s3_bucket.endpoint.storage_options, run_name="exp1")
    trainer = trainer_for(strategy)
    trainer.fit(DigitsModel(), datamodule=DigitsData(limit=300))
    best = trainer.checkpoint_callback.best_model_path
    assert best.startswith(f"{url}/exp1/checkpoints/") and best.endswith(".ckpt")
    restored = DigitsModel.load_from_checkpoint(best)
    assert isinstance(restored, DigitsModel)
    committed = list_committed(f"{url}/exp1/checkpoints", s3_bucket.endpoint.storage_options)
    assert {c.rsplit("/", 1)[-1] for c in committed} == {best.rsplit("/", 1)[-1], "last.ckpt"}


@pytest.mark.parametrize("url, cause", [
    ("s4://bucket/runs", "protocol"),
    ("s3://no-such-bucket-gpu-proxy/runs", "bucket"),
])
def test_unusable_checkpoint_dir_fails_at_home_before_any_worker(url, cause, s3_server):  # noqa: F811
    strategy = RemoteStrategy(checkpoint_dir=url, storage_options=s3_server.storage_options)
    import ray

    before = set(placement_group_table()) if ray.is_initialized() else set()  # warm groups of earlier tests
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        trainer_for(strategy).fit(DigitsModel(), datamodule=DigitsData(limit=100))
    assert url.split("/runs")[0] in str(info.value) and cause in str(info.value).lower()
    assert time.monotonic() - started < 15
    placed = [pg for key, pg in placement_group_table().items() if key not in before and pg["state"] != "REMOVED"]
    assert not placed  # no worker was placed for this run


def test_a_killed_worker_restarts_from_the_last_committed_checkpoint(tmp_path):
    home = TimedLogger()
    strategy = RemoteStrategy(checkpoint_dir=f"file://{tmp_path}/ckpts", max_failures=1, home_loggers=[home])
    # 240 training samples / 2 ranks / 32 = 4 steps per epoch: die in the third epoch, after two commits
    trainer = trainer_for(strategy, max_epochs=4,
                          callbacks=[KillOnce(rank=1, at_step=10, marker=str(tmp_path / "killed"))])
    trainer.fit(DigitsModel(), datamodule=DigitsData(limit=300))
    assert (tmp_path / "killed").exists()
    assert trainer.state.finished and trainer.current_epoch == 4 and trainer.global_step == 16
    epochs_logged = [m["epoch"] for _, m, _ in home.calls if "train_loss_epoch" in m]
    assert epochs_logged == [0, 1, 2, 3], "each epoch's metrics once, despite the restart"


def test_without_max_failures_a_killed_worker_fails_the_run_clearly(tmp_path):
    trainer = trainer_for(RemoteStrategy(), callbacks=[KillOnce(rank=1, at_step=2, marker=str(tmp_path / "k"))])
    with pytest.raises(WorkerLostError, match="rank 1"):
        trainer.fit(DigitsModel(), datamodule=DigitsData(limit=300))


def test_more_failures_than_allowed_lists_each_one(tmp_path):
    class KillAlways(KillOnce):
        def on_train_batch_end(self, trainer, *args):
            import os
            import signal

            if trainer.global_rank == 1 and trainer.global_step == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    strategy = RemoteStrategy(checkpoint_dir=str(tmp_path), max_failures=1)
    with pytest.raises(WorkerLostError, match=r"failed 2 times, more than max_failures=1:\n  1\. .*\n  2\. "):
        trainer_for(strategy, callbacks=[KillAlways(1, 1, "")]).fit(DigitsModel(), datamodule=DigitsData(limit=300))


def test_ckpt_path_last_and_a_named_run_continue_where_they_stopped(tmp_path):
    url = f"file://{tmp_path}/ckpts"
    first = trainer_for(RemoteStrategy(checkpoint_dir=url, run_name="resumable"), max_epochs=2)
    first.fit(DigitsModel(), datamodule=DigitsData(limit=300))
    steps_after_two = first.global_step
    again = trainer_for(RemoteStrategy(checkpoint_dir=url, run_name="resumable"), max_epochs=3)
    again.fit(DigitsModel(), datamodule=DigitsData(limit=300), ckpt_path="last")
    assert again.current_epoch == 3 and again.global_step == steps_after_two * 3 // 2
    named = trainer_for(RemoteStrategy(checkpoint_dir=url, run_name="resumable"), max_epochs=4)
    named.fit(DigitsModel(), datamodule=DigitsData(limit=300))  # no ckpt_path: the named run continues
    assert named.current_epoch == 4 and named.global_step == steps_after_two * 2


def test_max_failures_needs_a_checkpoint_dir():
    from gpu_proxy import ConfigurationError

    with pytest.raises(ConfigurationError, match="checkpoint_dir"):
        RemoteStrategy(max_failures=2)
