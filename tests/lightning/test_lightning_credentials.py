"""A run's credentials stay with the run: a later run in the same pooled Ray worker finds none of them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel
from tests.support.moto_s3 import FAKE_KEY, FAKE_SECRET, s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.usefixtures("local_cluster")


def _plain(value):
    """``value`` with every string as a plain str: a Concealed secret's repr is '***'."""
    if isinstance(value, dict):
        return {str.__str__(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str.__str__(value) if isinstance(value, str) else repr(value)


class CredentialProbe(Callback):
    """Records, inside the worker, what fsspec holds: its global config and the cached s3fs instances."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _record(self, when: str) -> None:
        import fsspec.config
        from s3fs import S3FileSystem

        record = {"pid": os.getpid(), "when": when, "conf": _plain(dict(fsspec.config.conf)),
                  "s3fs_instances": [_plain(fs.storage_options) for fs in S3FileSystem._cache.values()]}
        Path(self.path).write_text(json.dumps(record))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._record("start")

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.strategy.checkpoint_io is not None and hasattr(trainer.strategy.checkpoint_io, "wait"):
            trainer.strategy.checkpoint_io.wait()  # the uploads have used their filesystem by now
        self._record("end")


def fit(tmp_path, name, **strategy_kwargs) -> dict:
    probe = tmp_path / f"{name}.json"
    trainer = L.Trainer(strategy=RemoteStrategy(num_workers=1, **strategy_kwargs), accelerator="cpu",
                        max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing="checkpoint_dir" in strategy_kwargs,
                        callbacks=[CredentialProbe(str(probe))])
    trainer.fit(DigitsModel(), datamodule=DigitsData(limit=120))
    return json.loads(probe.read_text())


def test_a_later_run_in_the_same_worker_sees_none_of_an_earlier_runs_credentials(s3_bucket, tmp_path):  # noqa: F811
    first = fit(tmp_path, "first", checkpoint_dir=f"{s3_bucket.url}/runs",
                storage_options=s3_bucket.storage_options)
    assert FAKE_SECRET in json.dumps(first)  # the probe does see credentials where they are
    # Ray picks one of its pooled processes; fit again until a run lands where the first one ran.
    for attempt in range(6):
        second = fit(tmp_path, f"second{attempt}")
        if second["pid"] == first["pid"]:
            break
    assert second["pid"] == first["pid"], "no later run reused the first run's worker process"
    seen = json.dumps(second)
    assert FAKE_SECRET not in seen and FAKE_KEY not in seen, second
    assert "s3" not in second["conf"]
