"""Bad RemoteStrategy input is refused when it is made (or when the Trainer connects it), naming the fix.

Nothing here starts a worker: every refusal happens before a launch could.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy.errors import ConfigurationError
from gpu_proxy_lightning import RemoteStrategy
from gpu_proxy_lightning.checkpointing import RunStorage


def trainer(strategy, **kwargs):
    options = dict(strategy=strategy, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.mark.parametrize("name, value", [
    ("cluster", 8265),
    ("num_workers", "2"),
    ("num_workers", 2.0),
    ("num_workers", True),
    ("use_gpu", "yes"),
    ("resources_per_worker", "CPU=1"),
    ("resources_per_worker", {"CPU": "1"}),
    ("resources_per_worker", {"CPU": float("nan")}),
    ("resources_per_worker", {"GPU": True}),
    ("home_grace_s", "5m"),
    ("home_grace_s", float("nan")),
    ("home_grace_s", True),
    ("detach", "no"),
    ("checkpoint_dir", 123),
    ("checkpoint_dir", ""),
    ("storage_options", "profile"),
    ("storage_options", {1: "x"}),
    ("run_name", 7),
    ("max_failures", True),
    ("max_failures", 1.5),
    ("max_failures", "2"),
    ("process_group_backend", 1),
    ("home_loggers", "tb"),
    ("home_loggers", [object()]),
])
def test_a_wrong_type_is_refused_naming_the_parameter_the_value_and_a_fix(name, value):
    kwargs = {name: value}
    if name == "max_failures":
        kwargs["checkpoint_dir"] = "memory://runs"
    with pytest.raises(ConfigurationError) as info:
        RemoteStrategy(**kwargs)
    message = str(info.value)
    assert f"{name}=" in message
    assert repr(value) in message or (isinstance(value, list) and "object object" in message)
    assert "give" in message  # the fix


def test_home_loggers_accept_lightning_loggers_and_a_single_one(tmp_path):
    logger = CSVLogger(tmp_path)
    assert RemoteStrategy(home_loggers=[logger]).home_loggers == [logger]
    assert RemoteStrategy(home_loggers=logger).home_loggers == [logger]
    assert RemoteStrategy(checkpoint_dir=Path(tmp_path)).checkpoint_dir == str(tmp_path)


@pytest.mark.parametrize("run_name", ["../../x", "..", ".", "", "   ", "a/b", "/abs", "a\\b", "x\0y"])
def test_a_run_name_that_is_not_one_folder_is_refused(run_name):
    with pytest.raises(ConfigurationError, match="run_name=.*one folder under checkpoint_dir"):
        RemoteStrategy(checkpoint_dir="memory://runs", run_name=run_name)
    with pytest.raises(ConfigurationError, match="run_name=.*one folder under checkpoint_dir"):
        RunStorage("memory://runs", run_name, None)


def test_plain_run_names_are_accepted():
    assert RunStorage("memory://runs/", "exp1.v2-a_b", None).run_url == "memory://runs/exp1.v2-a_b"


@pytest.mark.parametrize("kwargs", [
    {"use_gpu": False, "resources_per_worker": {"GPU": 1}},
    {"use_gpu": True, "resources_per_worker": {"CPU": 2, "GPU": 0}},
])
def test_contradicting_gpu_settings_are_refused_at_construction(kwargs):
    with pytest.raises(ConfigurationError, match="contradict"):
        RemoteStrategy(**kwargs)


@pytest.mark.parametrize("accelerator, kwargs, match", [
    ("gpu", {"use_gpu": False}, "use_gpu=False"),
    ("cuda", {"resources_per_worker": {"CPU": 1, "GPU": 0}}, '"GPU": 0'),
    ("cpu", {"use_gpu": True}, "use_gpu=True"),
    ("cpu", {"resources_per_worker": {"GPU": 1}}, '"GPU": 1'),
])
def test_settings_contradicting_the_trainer_accelerator_are_refused_by_the_trainer(accelerator, kwargs, match):
    # The accelerator is known only once the Trainer connects the strategy: refused inside Trainer(...).
    with pytest.raises(ConfigurationError, match=match):
        trainer(RemoteStrategy(**kwargs), accelerator=accelerator, devices=1)


@pytest.mark.parametrize("accelerator, kwargs, resources", [
    ("cpu", {}, {"CPU": 1.0}),
    ("cpu", {"use_gpu": False, "resources_per_worker": {"CPU": 2}}, {"CPU": 2}),
    ("gpu", {}, {"CPU": 1.0, "GPU": 1.0}),
    ("gpu", {"resources_per_worker": {"CPU": 4}}, {"CPU": 4, "GPU": 1.0}),
    ("gpu", {"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 0.5}}, {"CPU": 1, "GPU": 0.5}),
])
def test_wants_gpu_agrees_with_what_the_workers_get(accelerator, kwargs, resources):
    strategy = trainer(RemoteStrategy(**kwargs), accelerator=accelerator, devices=1).strategy
    assert strategy.worker_resources() == resources
    assert strategy.wants_gpu() is (resources.get("GPU", 0) > 0)


def test_num_workers_sets_the_world_size_the_home_trainer_reports():
    with pytest.warns(UserWarning, match=r"num_workers=1\) overrides Trainer\(devices=2"):
        one = trainer(RemoteStrategy(num_workers=1), devices=2)
    assert (one.world_size, one.num_devices, one.strategy.worker_count()) == (1, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # devices left to "auto": no warning
        two = trainer(RemoteStrategy(num_workers=2))
    assert (two.world_size, two.strategy.worker_count()) == (2, 2)
    gpus = trainer(RemoteStrategy(num_workers=4), accelerator="gpu", devices=1, num_nodes=2)
    assert (gpus.world_size, gpus.num_devices, gpus.strategy.worker_count()) == (4, 2, 4)


def test_num_workers_that_cannot_split_over_the_nodes_is_refused():
    with pytest.raises(ConfigurationError, match=r"num_workers=3\) with Trainer\(num_nodes=2\)"):
        trainer(RemoteStrategy(num_workers=3), devices=1, num_nodes=2)
