"""RunPodServerless against a fake endpoint that speaks RunPod's endpoint API and runs the real handler
(cluster_image/serverless/handler.py) in a worker process per job, with its own Ray cluster."""
from __future__ import annotations

import pickle
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy import RunPodServerless, events, shipping
from gpu_proxy.clouds.runpod import RunPodAuthError, RunPodNotFoundError
from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs.control import RunControl
from gpu_proxy.runs.home import execute, values
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy_lightning import RemoteStrategy
from tests.fakes.serverless_endpoint import FakeServerlessEndpoint
from tests.lightning_project.models import DigitsData, DigitsModel, RecordRanks, load_record
from tests.support.processes import processes_mentioning


@pytest.fixture
def endpoint():
    with FakeServerlessEndpoint(cancel_grace_s=30) as fake:
        yield fake


def serverless(fake: FakeServerlessEndpoint, **options) -> RunPodServerless:
    return RunPodServerless(fake.endpoint_id, api_key=fake.api_key, base_url=fake.base_url, **options)


class HomeLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[float, dict]] = []
        self.finalized: list[str] = []

    name = property(lambda self: "home")
    version = property(lambda self: 0)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((time.monotonic(), dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def finalize(self, status):
        self.finalized.append(status)


class RecordingBar(TQDMProgressBar):
    def __init__(self) -> None:
        super().__init__(refresh_rate=1)
        self.train_batches: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.train_batches.append((trainer.current_epoch, batch_idx))


def test_lightning_fit_through_a_serverless_endpoint(endpoint, tmp_path):
    home, bar = HomeLogger(), RecordingBar()
    model = DigitsModel()
    trainer = L.Trainer(strategy=RemoteStrategy(cluster=serverless(endpoint, gpus_per_worker=0), home_loggers=[home]),
                        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=2,
                        callbacks=[bar, RecordRanks(str(tmp_path))])
    trainer.fit(model, datamodule=DigitsData(limit=200))
    rank0 = load_record(tmp_path, "fit", 0)  # what the worker's model held at the end
    for key, value in rank0["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value)
    assert trainer.state.finished and trainer.global_step == rank0["global_step"] == 5
    assert torch.equal(trainer.callback_metrics["val_loss"], rank0["callback_metrics"]["val_loss"])
    assert bar.train_batches == [(0, i) for i in range(5)]  # 160 samples / batch 32, live at home
    assert any("train_loss_step" in metrics for _, metrics in home.metrics) and home.finalized == ["success"]
    [job] = endpoint.jobs.values()
    assert job.status == "COMPLETED" and job.input["run"] and job.input["run_url"] is None
    assert ("GET", f"/v2/{endpoint.endpoint_id}/stream/{job.id}") in endpoint.requests


def test_a_run_over_the_request_limit_and_its_result_go_through_storage(endpoint, tmp_path):
    storage = tmp_path / "storage"
    cluster = serverless(endpoint, storage_url=f"file://{storage}", result_inline_max=1000)
    ballast = b"b" * 11_000_000  # the pickled run is over RunPod's 10 MB request limit

    def payload(ctx):
        return len(ballast), b"r" * 5000  # the result is over result_inline_max too

    spec = RunSpec(payload=shipping.dumps(payload), num_workers=1)
    seen = []
    assert values(execute(cluster, spec, seen.append)) == [(11_000_000, b"r" * 5000)]
    [job] = endpoint.jobs.values()
    assert job.input["run"] is None and job.input["run_url"].startswith(f"file://{storage}")
    result_events = [e for output in job.outputs for e in output["events"] if e["kind"] == events.RESULT]
    assert list(result_events[0]["data"]) == ["outcomes_url", "stopped"]  # not streamed
    assert not any(storage.rglob("*.pkl")), "the run's files stay in storage after it ended"
    assert events.RUN_STARTED in [e.kind for e in seen]


def test_a_large_run_without_storage_is_refused_before_anything_is_sent(endpoint):
    ballast = b"b" * 11_000_000
    spec = RunSpec(payload=shipping.dumps(lambda ctx: len(ballast)), num_workers=1)
    with pytest.raises(ConfigurationError, match="storage_url"):
        execute(serverless(endpoint), spec, lambda event: None)
    assert not [path for _, path in endpoint.requests if path.endswith("/run")]


def test_a_bad_endpoint_id_or_key_is_a_clear_error(endpoint):
    with pytest.raises(RunPodNotFoundError, match="no serverless endpoint 'nope'.*gpu-proxy serverless deploy"):
        RunPodServerless("nope", api_key=endpoint.api_key, base_url=endpoint.base_url).start()
    with pytest.raises(RunPodAuthError, match="refused the API key") as info:
        RunPodServerless(endpoint.endpoint_id, api_key="rp-wrong-key-1234", base_url=endpoint.base_url).start()
    assert "rp-wrong-key-1234" not in str(info.value)
    cluster = serverless(endpoint)
    assert "rp-fake-key" not in repr(cluster) and "rp-fake-key" not in repr(vars(cluster))
    assert b"rp-fake-key" not in pickle.dumps(cluster)
    with pytest.raises(ConfigurationError, match="https"):
        RunPodServerless("x", api_key="k", base_url="http://api.example.com/v2")


def test_a_remote_error_is_raised_at_home(endpoint):
    def payload(ctx):
        raise ValueError("boom in the serverless worker")

    spec = RunSpec(payload=shipping.dumps(payload), num_workers=1)
    with pytest.raises(ValueError, match="boom in the serverless worker") as info:
        values(execute(serverless(endpoint), spec, lambda event: None))
    assert "Remote traceback" in str(info.value)


def test_ctrl_c_cancels_the_job_and_leaves_nothing_running(endpoint, tmp_path):
    marker = tmp_path / "started"

    def payload(ctx):
        Path(marker).write_text(str(ctx.rank))
        while True:
            print("working", flush=True)
            time.sleep(0.2)

    spec = RunSpec(payload=shipping.dumps(payload), num_workers=1)
    interrupted = []

    def on_event(event):
        if event.kind == events.LOG and not interrupted:
            interrupted.append(event)
            raise KeyboardInterrupt  # what Ctrl-C does while home handles an event

    with pytest.raises(KeyboardInterrupt):
        execute(serverless(endpoint), spec, on_event)
    [job] = endpoint.jobs.values()
    assert ("POST", f"/v2/{endpoint.endpoint_id}/cancel/{job.id}") in endpoint.requests
    job = endpoint.wait_ended(job.id, timeout_s=60)
    assert job.status == "CANCELLED" and marker.exists()
    assert not job.killed_hard, "the handler did not end when its job was cancelled"
    assert job.after_cancel == {"ray_running": False}, "the handler left its Ray cluster running"
    deadline = time.monotonic() + 20
    while processes_mentioning(job.id[-12:]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(job.id[-12:]) == []  # neither the worker nor its Ray cluster


@pytest.mark.tf  # imports Keras, so TensorFlow, in this process
def test_keras_remote_fit_through_a_serverless_endpoint(endpoint):
    import keras
    import numpy as np

    from gpu_proxy_keras import RemoteFit
    from tests.keras_project.models import blobs, mlp

    x, y = blobs(n=64)
    model = mlp()
    before = [w.copy() for w in model.get_weights()]
    history = RemoteFit(model, cluster=serverless(endpoint)).fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert isinstance(history, keras.callbacks.History) and history.epoch == [0, 1]
    assert model.history is history and len(history.history["loss"]) == 2
    assert not all(np.allclose(a, b) for a, b in zip(before, model.get_weights()))  # trained weights came home


def test_ctrl_c_with_storage_stops_the_run_at_a_step_boundary_and_brings_it_home(endpoint, tmp_path):
    def payload(ctx):
        steps = 0
        while not ctx.should_stop():
            print("step", steps, flush=True)
            steps += 1
            time.sleep(0.1)
        return steps

    interrupted = []

    def on_event(event):
        if event.kind == events.LOG and not interrupted:
            interrupted.append(event)
            raise KeyboardInterrupt

    cluster = serverless(endpoint, storage_url=f"file://{tmp_path}/storage")
    spec = RunSpec(payload=shipping.dumps(payload), num_workers=1)
    control = RunControl(on_event, spec.name)
    outcomes = cluster.execute(spec, control)  # what home.execute runs before raising KeyboardInterrupt
    assert control.interrupted
    [steps] = values(outcomes)
    assert steps >= 1
    [job] = endpoint.jobs.values()
    assert job.status == "COMPLETED"  # stopped by the run itself, not cancelled
    assert not [path for _, path in endpoint.requests if "/cancel/" in path]
    result = [e for output in job.outputs for e in output["events"] if e["kind"] == events.RESULT][0]
    assert result["data"]["stopped"] is True
