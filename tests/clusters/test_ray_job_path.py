"""The second cluster path: an existing Ray cluster (``ray start --head`` on loopback, token auth),
where each run is a Ray Job whose driver runs the same supervisor as the embedded path."""
from __future__ import annotations

import lightning as L
import pytest
import torch

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy.clusters.ray_cluster import ClusterUnreachableError, RayCluster
from gpu_proxy.runs.job import JobRun
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel, RecordRanks, load_record


def make_trainer(cluster, folder, **kwargs):
    options = dict(accelerator="cpu", devices=2, max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    return L.Trainer(strategy=RemoteStrategy(cluster=cluster), callbacks=[RecordRanks(str(folder))], **options)


def test_fit_as_a_ray_job_brings_rank0_state_home(ray_head, tmp_path):
    cluster = RayCluster(ray_head.dashboard_url, token=ray_head.token)
    assert cluster.resources()["CPU"] == 2
    model = DigitsModel()
    trainer = make_trainer(cluster, tmp_path)
    trainer.fit(model, datamodule=DigitsData(limit=200))
    rank0 = load_record(tmp_path, "fit", 0)
    for key, value in rank0["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value)
    assert trainer.current_epoch == 1 and trainer.global_step == rank0["global_step"]
    assert trainer.state.finished
    assert torch.equal(trainer.callback_metrics["val_loss"], rank0["callback_metrics"]["val_loss"])


def test_address_string_takes_the_token_from_ray_sources(ray_head, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    trainer = make_trainer(ray_head.dashboard_url, tmp_path)
    result = trainer.test(DigitsModel(), datamodule=DigitsData(limit=200), verbose=False)
    assert "test_acc" in result[0]


def test_worker_error_comes_home_through_the_job(ray_head, tmp_path):
    trainer = make_trainer(RayCluster(ray_head.dashboard_url, token=ray_head.token), tmp_path)
    with pytest.raises(ValueError, match="boom on rank 0") as info:
        trainer.fit(DigitsModel(fail_on_rank=0), datamodule=DigitsData(limit=200))
    assert "Remote traceback" in str(info.value)


def test_too_large_a_request_fails_in_the_driver_before_workers_start(ray_head, tmp_path):
    from gpu_proxy import ClusterResourceError

    trainer = make_trainer(RayCluster(ray_head.dashboard_url, token=ray_head.token), tmp_path, devices=5)
    with pytest.raises(ClusterResourceError, match="5 workers"):
        trainer.fit(DigitsModel(), datamodule=DigitsData(limit=200))


def test_missing_or_wrong_token_is_a_clear_error(ray_head, monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ClusterUnreachableError, match="needs an auth token"):
        RayCluster(ray_head.dashboard_url).start()
    with pytest.raises(ClusterUnreachableError, match="rejected"):
        RayCluster(ray_head.dashboard_url, token="0" * 64).start()
    assert "0" * 64 not in repr(RayCluster(ray_head.dashboard_url, token="0" * 64))


def test_unreachable_dashboard_names_the_address():
    with pytest.raises(ClusterUnreachableError, match="127.0.0.1:9"):
        RayCluster("http://127.0.0.1:9", timeout_s=2).start()


def test_reconnect_replays_without_gaps_or_duplicates(ray_head, tmp_path):
    """A second follower of a finished job sees the same ordered events; one resuming skips what it saw."""
    from gpu_proxy import shipping
    from gpu_proxy.runs import RunSpec, values

    def payload(ctx):
        for i in range(5):
            print(f"line {i} from {ctx.rank}")
        return ctx.rank

    endpoint = RayCluster(ray_head.dashboard_url, token=ray_head.token).endpoint()
    run = JobRun.submit(endpoint, RunSpec(shipping.dumps(payload), num_workers=2))
    first: list = []
    outcomes = run.follow(first.append)
    seqs = [e.seq for e in first]
    assert seqs == sorted(set(seqs)) and len([e for e in first if e.kind == "log"]) == 10
    assert values(outcomes) == [0, 1]
    again = JobRun(endpoint, run.job_id)
    replay: list = []
    again.follow(replay.append)
    assert [e.seq for e in replay] == seqs
    resumed = JobRun(endpoint, run.job_id)
    resumed.last_seq = seqs[3]
    rest: list = []
    resumed.follow(rest.append)
    assert [e.seq for e in rest] == seqs[4:]
