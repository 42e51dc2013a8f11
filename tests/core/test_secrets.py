"""Credentials in storage_options reach the workers but never a pickle, a file or the cluster's store."""
from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy import shipping
from gpu_proxy.clusters.ray_cluster import RayCluster
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.secrets import Concealed, conceal, installed
from gpu_proxy.storage import list_committed
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401


def test_a_concealed_value_pickles_as_a_reference_and_travels_beside_the_payload():
    secret = f"canary-{uuid.uuid4().hex}"
    options = conceal({"key": "AKIA-ID-0001", "secret": secret, "client_kwargs": {"endpoint_url": "http://x"}})
    assert options["secret"] == secret and isinstance(options["secret"], Concealed)
    assert not isinstance(options["client_kwargs"]["endpoint_url"], Concealed)
    assert secret not in repr(options)
    found: dict[str, str] = {}
    payload = shipping.dumps({"options": options}, secrets=found)
    assert secret.encode() not in payload and secret in found.values()
    spec = RunSpec(payload=payload, num_workers=1, secrets=found)
    assert secret.encode() not in pickle.dumps(spec)  # run.pkl on the Ray Job path
    with installed(found):
        assert shipping.loads(payload)["options"]["secret"] == secret


def test_a_reference_without_its_run_cannot_be_revealed():
    payload = shipping.dumps(conceal({"password": f"canary-{uuid.uuid4().hex}"}))
    from gpu_proxy import secrets

    with secrets._known_lock:
        saved = dict(secrets._known)
        secrets._known.clear()  # a process that never saw the secret: a worker outside the run
    try:
        with pytest.raises(GpuProxyError, match="not available in this process"):
            shipping.loads(payload)
    finally:
        with secrets._known_lock:
            secrets._known.update(saved)


def _files_containing(folder: Path, needle: bytes) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:
            continue
    return hits


def test_s3_credentials_reach_a_ray_job_run_but_no_file_on_the_cluster(ray_head, s3_bucket, tmp_path):  # noqa: F811
    secret = f"canary-secret-{uuid.uuid4().hex}"
    options = {**s3_bucket.endpoint.storage_options, "secret": secret}
    url = f"s3://{s3_bucket.name}/secret-runs"
    strategy = RemoteStrategy(cluster=RayCluster(ray_head.dashboard_url, token=ray_head.token),
                              checkpoint_dir=url, storage_options=options, run_name="canary")
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=1, logger=False,
                        callbacks=[ModelCheckpoint(save_last=True)], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(DigitsModel(), datamodule=DigitsData(limit=100))
    committed = list_committed(f"{url}/canary/checkpoints", options)  # the workers wrote with the secret
    assert any(c.endswith("last.ckpt") for c in committed)
    cluster_files = Path(ray_head.token_path).parent  # the head's whole temp dir: packages, logs, spilled objects
    assert _files_containing(cluster_files, secret.encode()) == []
