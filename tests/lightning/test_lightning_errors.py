"""Errors: raised at home with the remote traceback, early when the input is bad, nothing left behind."""
from __future__ import annotations

import socket
import threading

import lightning as L
import pytest
import ray
from lightning.pytorch.callbacks import Callback
from ray.util.placement_group import placement_group_table

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy import ClusterResourceError, ShippingError
from gpu_proxy.errors import ConfigurationError
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel

pytestmark = pytest.mark.usefixtures("local_cluster")


def trainer(**kwargs):
    options = dict(strategy="remote_gpu", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    return L.Trainer(**options)


def live_placement_groups() -> list:
    return [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]


def cpus_in_use() -> float:
    import time

    deadline = time.monotonic() + 10  # Ray reports freed resources with a short delay
    while True:
        in_use = ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0.0)
        if in_use == 0 or time.monotonic() > deadline:
            return in_use
        time.sleep(0.2)


def test_worker_exception_is_raised_at_home_with_remote_traceback():
    with pytest.raises(ValueError, match="boom on rank 1") as info:
        trainer().fit(DigitsModel(fail_on_rank=1), datamodule=DigitsData(limit=200))
    message = str(info.value)
    assert "Remote traceback (rank 1)" in message and "training_step" in message
    assert live_placement_groups() == []


class UnpicklableError(Exception):
    def __init__(self, code: int, lock: object) -> None:
        super().__init__(code)
        self.lock = lock


class RaisesUnpicklable(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        raise UnpicklableError(3, threading.Lock())


def test_an_exception_that_cannot_travel_becomes_remote_error():
    from gpu_proxy import RemoteError

    with pytest.raises(RemoteError, match="UnpicklableError") as info:
        trainer(callbacks=[RaisesUnpicklable()]).fit(DigitsModel(), datamodule=DigitsData(limit=200))
    assert "on_train_start" in info.value.remote_traceback


class LockedModel(DigitsModel):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


class LockedCallback(Callback):
    def __init__(self) -> None:
        self.handle = socket.socket()


def test_unpicklable_module_is_named_before_any_worker_starts():
    with pytest.raises(ShippingError, match=r"LightningModule LockedModel\.lock"):
        trainer().fit(LockedModel(), datamodule=DigitsData(limit=200))
    assert live_placement_groups() == []


def test_unpicklable_callback_is_named():
    with pytest.raises(ShippingError, match=r"callback LockedCallback\.handle"):
        trainer(callbacks=[LockedCallback()]).fit(DigitsModel(), datamodule=DigitsData(limit=200))


def test_asking_for_more_than_the_cluster_has_fails_fast_naming_what_it_has():
    with pytest.raises(ClusterResourceError, match=r"8 workers .* the cluster has 2 CPU"):
        trainer(devices=8).fit(DigitsModel(), datamodule=DigitsData(limit=200))
    assert live_placement_groups() == []


def test_gpu_accelerator_on_a_machine_without_gpus():
    remote = trainer(accelerator="gpu", devices=2, num_nodes=2)
    strategy = remote.strategy
    assert isinstance(strategy, RemoteStrategy)
    assert strategy.worker_count() == 4
    assert strategy.worker_resources() == {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(ClusterResourceError, match="GPU"):
        remote.fit(DigitsModel(), datamodule=DigitsData(limit=200))


def test_cuda_flag_and_explicit_overrides():
    remote = trainer(accelerator="cuda", devices=1,
                     strategy=RemoteStrategy(num_workers=3, resources_per_worker={"CPU": 2, "GPU": 1}))
    assert remote.strategy.worker_count() == 3
    assert remote.strategy.worker_resources() == {"CPU": 2, "GPU": 1}
    cpu = trainer(strategy=RemoteStrategy(use_gpu=False, num_workers=2))
    assert cpu.strategy.worker_resources() == {"CPU": 1.0}


@pytest.mark.parametrize("kwargs, match", [
    ({"num_workers": 0}, "num_workers=0"),
    ({"resources_per_worker": {"CPU": -1}}, "resources_per_worker"),
    ({"home_grace_s": 1}, "home_grace_s=1"),
    ({"max_failures": -1, "checkpoint_dir": "memory://x"}, "max_failures=-1"),
])
def test_bad_strategy_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        RemoteStrategy(**kwargs)


def test_ray_client_address_is_refused_with_an_explanation():
    with pytest.raises(ConfigurationError, match="dashboard address"):
        trainer(strategy=RemoteStrategy(cluster="ray://10.0.0.1:10001")).fit(DigitsModel(), datamodule=DigitsData())


def test_no_worker_is_left_running_after_errors():
    assert ray.is_initialized()
    assert cpus_in_use() == 0
