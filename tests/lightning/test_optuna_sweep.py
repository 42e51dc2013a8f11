"""Optuna studies whose trials are remote Lightning fits, driven from home (docs/sweeps.md)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from gpu_proxy.clouds.runpod.meter import CostMeter
from gpu_proxy.clusters.base import Cluster, all_active_runs
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.runs.pool import current_pool
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


def test_a_study_in_sqlite_resumes_after_home_was_killed_mid_sweep(ray_head, tmp_path, monkeypatch, capsys):
    url, total = f"sqlite:///{tmp_path}/study.db", 3
    command = [sys.executable, "-m", "tests.sweep_project", ray_head.dashboard_url, url, str(tmp_path), str(total)]
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
    assert 2 <= len(before) < total

    # A new home (this process) resumes the study from its SQLite file.
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    sweep_project.resume(ray_head.dashboard_url, url, str(tmp_path), total)
    assert f"resuming with {len(before)} finished" in capsys.readouterr().out
    study = optuna.load_study(study_name="sweep", storage=url)
    summary = [(t.number, t.state.name, t.params) for t in study.trials]
    assert len(finished(study)) == total, summary  # the total the sweep asked for
    assert {t.number: t.value for t in finished(study) if t.number in before} == before  # kept as they were
    # The trials home's death left running were failed at the resume; none is left RUNNING.
    assert [t for t in study.trials if t.state == TrialState.FAIL], summary
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING)), summary


def _step(note: Path) -> int:
    try:
        return int(note.read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or being written
        return -1


def _when_training(notes: list[Path], then) -> threading.Thread:
    """Call ``then()`` from another thread once every note shows a few steps trained."""
    def wait() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(_step(note) >= 5 for note in notes):
            time.sleep(0.05)
        then()
    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _busy_groups() -> list[dict]:
    return [group for group in current_pool().describe() if group["state"] == "busy"]


def test_a_real_ctrl_c_stops_every_running_trial_and_starts_no_other(local_cluster, tmp_path):
    study = sweep_project.new_study(trials=[{"lr": 0.1, "fail": False}] * 4)
    notes = [tmp_path / "step0", tmp_path / "step1"]
    main, pressed = threading.main_thread().ident, {}

    def press() -> None:  # as a terminal's Ctrl-C: SIGINT to the main thread, waking it from its wait
        pressed["at"] = time.monotonic()
        signal.pthread_kill(main, signal.SIGINT)

    _when_training(notes, press)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            optimize(study, sweep_project.make_objective(local_cluster, str(tmp_path), max_epochs=100),
                     n_trials=4, n_concurrent=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    stopped_in = time.monotonic() - pressed["at"]
    print(f"Ctrl-C to optimize() raising: {stopped_in:.2f} s")
    assert stopped_in < 20  # the next stop check (10 batches), then rank 0's state home, for both
    # Optuna marks a trial that Ctrl-C ended FAIL; no trial started after the Ctrl-C (the two enqueued
    # ones wait for the study's next optimize).
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2
    assert all_active_runs() == [] and _busy_groups() == []  # the runs ended and gave their workers back
    steps = [_step(note) for note in notes]
    time.sleep(1.0)
    assert [_step(note) for note in notes] == steps and max(steps) < 100 * BATCHES_PER_EPOCH - 1  # stopped


class MeteredCluster(Cluster):
    """The embedded cluster billed as a RunPod cluster is: RunPod's own cost meter, at ``usd_per_hour``
    (what RunPod's API reports for the pods; the test sets it), stopping the runs at ``budget_usd``
    and then ending the "pods" (a cluster that then refuses to start)."""

    def __init__(self, inner: Cluster, usd_per_hour: float, budget_usd: float) -> None:
        self.inner, self.usd_per_hour, self.budget_usd = inner, usd_per_hour, budget_usd
        self.budget_exceeded = False
        self._meter: CostMeter | None = None
        self._final_spend: float | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self.budget_exceeded:
                raise GpuProxyError(f"{self!r} was torn down: it reached budget_usd={self.budget_usd:g}.")
            self.inner.start()
            if self._meter is None:
                self._meter = CostMeter(self, lambda: self.usd_per_hour, interval_s=0.2, budget_usd=self.budget_usd,
                                        checkpoint_margin_s=0.0, grace_s=60, end=self._end).start()

    def _end(self) -> None:  # the pods are terminated: they cost nothing more
        self._final_spend = self._meter.spent_usd()
        self.budget_exceeded = True

    def cost(self) -> dict:
        spent = self._final_spend if self._final_spend is not None else \
            self._meter.spent_usd() if self._meter else 0.0
        return {"spent_usd": spent, "usd_per_hour": self.usd_per_hour, "budget_usd": self.budget_usd}

    def resources(self) -> dict:
        return self.inner.resources()

    def data_plane(self, spec):
        return self.inner.data_plane(spec)

    def execute(self, spec, control):
        return self.inner.execute(spec, control)


def test_each_trial_has_its_cost_and_the_clusters_budget_ends_the_sweep(local_cluster, tmp_path):
    metered = MeteredCluster(local_cluster, usd_per_hour=36.0, budget_usd=50.0)  # $0.01 a second

    def objective(trial: optuna.Trial) -> float:
        trainer = sweep_project.make_trainer(metered, [], max_epochs=MAX_EPOCHS if trial.number < 2 else 100)
        model = sweep_project.Regressor(trial.suggest_float("lr", 0.05, 0.5), False, str(tmp_path / f"step{trial.number}"))
        trainer.fit(model, *sweep_project.loaders())
        return trainer.callback_metrics["val_loss"].item()

    def expensive() -> None:  # the third and fourth trials train: the price jumps to $1000 a second
        metered.usd_per_hour = 3.6e6

    _when_training([tmp_path / "step2", tmp_path / "step3"], expensive)
    study = sweep_project.new_study(trials=[])
    total = optimize(study, objective, n_trials=6, n_concurrent=2, cluster=metered)
    states = [t.state for t in study.trials]
    # The meter stopped the two trials running when the budget was reached; no trial started after.
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 2, states
    deadline = time.monotonic() + 10
    while not metered.budget_exceeded and time.monotonic() < deadline:  # then the meter ends the "pods"
        time.sleep(0.1)
    assert metered.budget_exceeded
    costs = [t.user_attrs["cost_usd"] for t in study.trials]
    for t in study.trials[:2]:  # side by side at $0.01/s: each about half of what the cluster cost meanwhile
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
        assert 0.3 * 0.01 * seconds <= t.user_attrs["cost_usd"] <= 0.01 * seconds + 1e-6, (costs, seconds)
    assert min(costs[2:]) > 1.0  # the stopped trials ran at $1000/s
    assert sum(costs) <= total + 1e-6 and total >= metered.budget_usd
    assert total <= metered.cost()["spent_usd"]
