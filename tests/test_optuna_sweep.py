"""Optuna studies whose trials are remote Lightning fits, driven from home (docs/sweeps.md)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from gpu_proxy.sweeps import optimize
from tests import sweep_project
from tests.sweep_project import BATCHES_PER_EPOCH, MAX_EPOCHS, TRIALS

optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX_STEPS = BATCHES_PER_EPOCH * MAX_EPOCHS


def run_sweep(cluster, folder) -> optuna.Study:
    study = sweep_project.new_study()
    started = time.monotonic()
    optimize(study, sweep_project.make_objective(cluster, str(folder)), n_trials=len(TRIALS), n_concurrent=2)
    print(f"{len(TRIALS)} trials in {time.monotonic() - started:.1f} s")
    return study


def check_sweep(study: optuna.Study, folder) -> None:
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]
    pruned = study.trials[3]
    assert list(pruned.intermediate_values) == [0]  # reported at home after its first epoch, then pruned
    last_step = int((folder / "step3").read_text())
    # The stop reached the worker within a few steps of the prune (the ranks agree every 10 batches).
    assert BATCHES_PER_EPOCH <= last_step < 2 * BATCHES_PER_EPOCH < MAX_STEPS
    assert int((folder / "step4").read_text()) == 3  # the failing trial ended where it raised
    # The failure was that trial's only: a trial running beside it ran to its own end, and the sweep went on.
    failed = study.trials[4]
    beside = [t for t in study.trials if t.number != failed.number
              and t.datetime_start < failed.datetime_complete and t.datetime_complete > failed.datetime_start]
    assert beside and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in beside)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all(int((folder / f"step{t.number}").read_text()) == MAX_STEPS - 1 for t in complete)
    best = min(complete, key=lambda t: t.value)
    assert study.best_trial.number == best.number and study.best_value == best.value
    assert study.best_params == TRIALS[best.number]
    assert best.value < 0.05 and pruned.intermediate_values[0] > sweep_project.PRUNE_ABOVE


def test_a_sweep_on_the_embedded_cluster_prunes_mid_run_and_survives_a_failing_trial(local_cluster, tmp_path):
    check_sweep(run_sweep(None, tmp_path), tmp_path)


def test_a_sweep_on_a_cluster_by_address_prunes_mid_run_and_survives_a_failing_trial(ray_head, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    check_sweep(run_sweep(ray_head.dashboard_url, tmp_path), tmp_path)


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def test_a_study_in_sqlite_resumes_after_home_was_killed_mid_sweep(ray_head, tmp_path):
    url = f"sqlite:///{tmp_path}/study.db"
    command = [sys.executable, "-m", "tests.sweep_project", ray_head.dashboard_url, url, str(tmp_path), "5"]
    env = dict(os.environ, RAY_AUTH_TOKEN_PATH=ray_head.token_path, PYTHONPATH=str(Path.cwd()))
    home = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and home.poll() is None:
            try:
                study = optuna.load_study(study_name="sweep", storage=url)
                if len(finished(study)) >= 2 and study.get_trials(states=(TrialState.RUNNING,)):
                    break
            except KeyError:  # the study is not created yet
                pass
            time.sleep(0.2)
        assert home.poll() is None, home.communicate()[0][-3000:]
        os.kill(home.pid, signal.SIGKILL)  # mid-sweep: a trial is running
        home.wait()
    finally:
        if home.poll() is None:
            home.kill()
    before = {t.number: t.value for t in finished(optuna.load_study(study_name="sweep", storage=url))}
    assert 2 <= len(before) < 5

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming with {len(before)} finished" in resumed.stdout
    study = optuna.load_study(study_name="sweep", storage=url)
    summary = [(t.number, t.state.name, t.params) for t in study.trials]
    assert len(finished(study)) == 5, summary  # the total the sweep asked for
    assert {t.number: t.value for t in finished(study) if t.number in before} == before  # kept as they were
    # The trials home's death left running were failed at the resume; none is left RUNNING.
    assert [t for t in study.trials if t.state == TrialState.FAIL], summary
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING)), summary
