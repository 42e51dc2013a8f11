"""Two Ray nodes of one loopback cluster: one worker on each, ranks by node, checkpoints to S3."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy import RayCluster
from gpu_proxy.storage import list_committed
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel, RecordRanks, load_record
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401


def test_one_worker_per_node_writing_checkpoints_to_s3(ray_two_nodes, s3_bucket, tmp_path, monkeypatch):
    import fsspec.config

    cluster = RayCluster(ray_two_nodes.dashboard_url, token=ray_two_nodes.token)
    assert cluster.resources()["CPU"] == 2
    options = dict(s3_bucket.endpoint.storage_options)
    strategy = RemoteStrategy(cluster=cluster, checkpoint_dir=f"s3://{s3_bucket.name}/runs", storage_options=options,
                              run_name="two-nodes")
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, num_nodes=2, max_epochs=2,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(monitor="val_loss"), RecordRanks(str(tmp_path))])
    trainer.fit(DigitsModel(), datamodule=DigitsData(limit=200))
    assert trainer.state.finished
    records = [load_record(tmp_path, "fit", rank) for rank in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2] and records[0]["pid"] != records[1]["pid"]
    assert [(r["num_nodes"], r["node_rank"], r["local_rank"]) for r in records] == [(2, 0, 0), (2, 1, 0)]
    assert list_committed(f"s3://{s3_bucket.name}/runs/two-nodes/checkpoints", options)
    assert trainer.checkpoint_callback.best_model_path.startswith(f"s3://{s3_bucket.name}/runs/two-nodes/")
    assert fsspec.config.conf.get("s3")  # the fixture's options, used by load_from_checkpoint here
    DigitsModel.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
