"""Detached runs on a Ray cluster, re-attaching to them, and the gpu-proxy CLI that does it by hand."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gpu_proxy
from gpu_proxy import events

CLI = [sys.executable, "-m", "gpu_proxy.cli"]

DETACHING_HOME = textwrap.dedent('''
    import sys, lightning as L
    import gpu_proxy_lightning
    from gpu_proxy import RayCluster
    from gpu_proxy_lightning import RemoteStrategy
    from tests.lightning_project.models import DigitsData, DigitsModel

    strategy = RemoteStrategy(cluster=RayCluster(sys.argv[1]), detach=True)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(DigitsModel(), datamodule=DigitsData(limit=200))
    print("RUN_ID", strategy.run_id)
''')


@pytest.fixture(scope="module")
def detached_run(ray_head, tmp_path_factory):
    """A home process that submits a detached run and is gone before the run ends."""
    script = tmp_path_factory.mktemp("home") / "home.py"
    script.write_text(DETACHING_HOME)
    env = dict(os.environ, RAY_AUTH_TOKEN_PATH=ray_head.token_path, PYTHONPATH=str(Path.cwd()))
    done = subprocess.run([sys.executable, str(script), ray_head.dashboard_url], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    run_id = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("RUN_ID"))
    return run_id


def test_reattaching_replays_every_event_once_and_returns_the_result(ray_head, detached_run, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    seen: list = []
    outputs = gpu_proxy.attach(detached_run, cluster=ray_head.dashboard_url, on_event=seen.append)
    seqs = [e.seq for e in seen]
    assert seqs == list(range(len(seqs))), "events must arrive once each, in order, from the start"
    progress = [e for e in seen if e.kind == events.PROGRESS and e.data["hook"] == "on_train_epoch_end"]
    assert [e.data["epoch"] for e in progress] == [0, 1]
    assert outputs[0].trainer_state.finished and outputs[0].weights


def cli(*args, env=None, timeout=120):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_end_to_end(ray_head, detached_run, tmp_path):
    env = dict(os.environ, GPU_PROXY_CONFIG_DIR=str(tmp_path), RAY_AUTH_TOKEN_PATH=ray_head.token_path)
    up = cli("up", "ray", "--address", ray_head.dashboard_url, "--name", "lab", env=env)
    assert up.returncode == 0, up.stderr
    status = cli("status", "lab", env=env)
    assert status.returncode == 0 and "lab" in status.stdout and " 2 " in status.stdout
    runs = cli("runs", "-c", "lab", env=env)
    assert runs.returncode == 0 and detached_run in runs.stdout
    logs = cli("logs", detached_run, "-c", "lab", env=env)
    assert logs.returncode == 0 and "(rank 0)" in logs.stdout
    attach = cli("attach", detached_run, "-c", "lab", env=env)
    assert attach.returncode == 0 and "epoch 1" in attach.stdout
    assert ray_head.token not in up.stdout + status.stdout + runs.stdout + logs.stdout + attach.stdout
    down = cli("down", "lab", env=env)
    assert down.returncode == 0 and "forgotten" in down.stdout
    assert cli("status", "lab", env=env).returncode == 1  # no longer saved: not an address either


def test_cli_help_and_exit_codes(tmp_path):
    env = dict(os.environ, GPU_PROXY_CONFIG_DIR=str(tmp_path))
    for command in ([], ["up"], ["status"], ["dashboard"], ["runs"], ["logs"], ["attach"], ["down"]):
        assert cli(*command, "--help", env=env).returncode == 0
    assert cli("frobnicate", env=env).returncode == 2
    unreachable = cli("status", "http://127.0.0.1:9", env=env)
    assert unreachable.returncode == 1 and "unreachable" in unreachable.stdout
    assert cli("runs", "-c", "local", env=env).returncode == 1  # the embedded cluster has no runs to list


def test_detach_on_the_embedded_cluster_is_refused_before_anything_runs():
    import lightning as L

    import gpu_proxy_lightning  # noqa: F401
    from gpu_proxy import ConfigurationError
    from gpu_proxy_lightning import RemoteStrategy
    from tests.lightning_project.models import DigitsData, DigitsModel

    trainer = L.Trainer(strategy=RemoteStrategy(detach=True), accelerator="cpu", devices=1, max_epochs=1,
                        logger=False, enable_checkpointing=False)
    with pytest.raises(ConfigurationError, match="outlives this process"):
        trainer.fit(DigitsModel(), datamodule=DigitsData(limit=100))
