"""AsyncFsspecCheckpointIO with real Lightning training on CPU, on S3 (moto server) and custom filesystems."""
from __future__ import annotations

import threading

import cloudpickle
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gpu_proxy.storage import UploadError, committed_details, latest_committed, list_committed, resolve
from gpu_proxy_lightning.checkpoint_io import AsyncFsspecCheckpointIO
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401
from tests.support.toy_fs import toyfs  # noqa: F401


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _data(n: int = 64):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x, y), batch_size=32)


def _trainer(max_epochs: int, checkpoint_io, callbacks, tmp_path) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     plugins=[checkpoint_io], default_root_dir=str(tmp_path))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_model_checkpoint_top_k_resume_and_load_on_s3(s3_bucket, tmp_path):  # noqa: F811
    dirpath = f"{s3_bucket.url}/runs/exp1/checkpoints"
    checkpoint = ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True,
                                 filename="{epoch}-{val_loss:.4f}")
    commits = []
    io = AsyncFsspecCheckpointIO(on_commit=lambda url, meta: commits.append((url, meta["global_step"])))
    train, val = _data()
    model = Regressor()
    trainer = _trainer(5, io, [checkpoint], tmp_path)
    trainer.fit(model, train, val)
    steps_per_epoch = trainer.global_step // 5
    assert (f"{dirpath}/last.ckpt", trainer.global_step) in commits  # reported once committed
    assert [step for url, step in commits if url.endswith("last.ckpt")] == \
        [steps_per_epoch * (epoch + 1) for epoch in range(5)]

    # Retention on S3: exactly the top 2 + last are committed, and nothing else is in the folder.
    committed = list_committed(dirpath)
    assert len(committed) == 3 and f"{dirpath}/last.ckpt" in committed
    top_k = {path for path in checkpoint.best_k_models}
    assert top_k | {f"{dirpath}/last.ckpt"} == set(committed)
    fs, path = resolve(dirpath)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False) if p.endswith(".ckpt")) == \
        sorted(c.rsplit("/", 1)[1] for c in committed)
    assert latest_committed(dirpath) in committed
    # The markers say which step each checkpoint holds, without loading it.
    last_marker = {c.name: c for c in committed_details(dirpath)}["last.ckpt"]
    assert last_marker.meta == {"epoch": 4, "global_step": trainer.global_step}

    # best_model_path is an s3 URL that plain Lightning loads (no plugin involved).
    assert checkpoint.best_model_path.startswith(dirpath)
    best = Regressor.load_from_checkpoint(checkpoint.best_model_path)
    assert best.hparams.hidden == 8
    last = Regressor.load_from_checkpoint(f"{dirpath}/last.ckpt")
    assert _same_weights(last, model)  # last.ckpt holds the weights the fit ended with

    # Resume from the S3 URL: training continues from the saved step, not from scratch, and
    # retention carries on with the restored top-k.
    def same_callback():
        return ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True,
                               filename="{epoch}-{val_loss:.4f}")

    resumed = _trainer(7, AsyncFsspecCheckpointIO(), [same_callback()], tmp_path)
    resumed.fit(Regressor(), train, val, ckpt_path=f"{dirpath}/last.ckpt")
    assert resumed.current_epoch == 7
    assert resumed.global_step == trainer.global_step * 7 // 5
    assert len(list_committed(dirpath)) == 3

    # ckpt_path="last" finds last.ckpt through ModelCheckpoint's own listing of the S3 folder.
    again = _trainer(8, AsyncFsspecCheckpointIO(), [same_callback()], tmp_path)
    again.fit(Regressor(), train, val, ckpt_path="last")
    assert again.global_step == trainer.global_step * 8 // 5


def test_save_returns_before_the_upload_and_teardown_waits(toyfs, tmp_path):  # noqa: F811
    toyfs.write_gate = threading.Event()
    io = AsyncFsspecCheckpointIO()
    train, _ = _data()
    trainer = _trainer(1, io, [], tmp_path)
    trainer.fit(Regressor(), train)  # no ModelCheckpoint dirpath on toyfs: only the explicit save below
    url = "toyfs://bucket/manual/step.ckpt"
    safety_net = threading.Timer(10, toyfs.write_gate.set)  # a blocking save fails below instead of hanging
    safety_net.start()
    trainer.save_checkpoint(url)  # serialised here, uploaded behind
    assert toyfs.writes_started.wait(10)
    assert latest_committed("toyfs://bucket/manual") is None
    safety_net.cancel()
    releaser = threading.Timer(0.3, toyfs.write_gate.set)
    releaser.start()
    io.teardown()  # blocks until committed
    releaser.join()
    assert latest_committed("toyfs://bucket/manual") == url
    assert io.load_checkpoint(url)["global_step"] == trainer.global_step


def test_upload_failure_fails_the_fit(toyfs, tmp_path):  # noqa: F811
    toyfs.fail_after_bytes = 100
    checkpoint = ModelCheckpoint(dirpath="toyfs://bucket/failing", save_top_k=-1, every_n_epochs=1)
    train, _ = _data()
    with pytest.raises(UploadError, match="toyfs://bucket/failing/epoch=0"):
        _trainer(3, AsyncFsspecCheckpointIO(), [checkpoint], tmp_path).fit(Regressor(), train)
    assert latest_committed("toyfs://bucket/failing") is None


def test_an_uncommitted_checkpoint_is_refused(toyfs):  # noqa: F811
    io = AsyncFsspecCheckpointIO()
    io.save_checkpoint({"state": torch.ones(3)}, "toyfs://bucket/run/good.ckpt")
    io.wait()
    fs, _ = resolve("toyfs://bucket")
    fs.pipe_file("bucket/run/half-written.ckpt", b"PK\x03\x04 cut short")
    with pytest.raises(FileNotFoundError, match="never committed"):
        io.load_checkpoint("toyfs://bucket/run/half-written.ckpt")
    with pytest.raises(FileNotFoundError, match="not found"):
        io.load_checkpoint("toyfs://bucket/run/missing.ckpt")
    assert torch.equal(io.load_checkpoint("toyfs://bucket/run/good.ckpt")["state"], torch.ones(3))
    io.teardown()


def test_storage_options_per_call_and_pickling(s3_bucket, tmp_path, monkeypatch):  # noqa: F811
    import fsspec.config
    monkeypatch.delitem(fsspec.config.conf, "s3")  # only the plugin's options know the endpoint
    io = AsyncFsspecCheckpointIO(storage_options=s3_bucket.storage_options, max_pending=2)
    shipped = cloudpickle.loads(cloudpickle.dumps(io))  # as inside a trainer sent to a worker
    url = f"{s3_bucket.url}/shipped/a.ckpt"
    shipped.save_checkpoint({"x": torch.arange(5)}, url)
    shipped.teardown()
    assert latest_committed(f"{s3_bucket.url}/shipped", s3_bucket.storage_options) == url
    assert torch.equal(io.load_checkpoint(url)["x"], torch.arange(5))
    io.remove_checkpoint(url)
    io.teardown()
    assert latest_committed(f"{s3_bucket.url}/shipped", s3_bucket.storage_options) is None
