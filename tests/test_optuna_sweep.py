"""Optuna studies whose trials are remote Lightning fits, driven from home (docs/sweeps.md)."""
from __future__ import annotations

import time

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
    failed, neighbour = study.trials[4], study.trials[5]  # the trial beside the failing one ran on, to its end
    assert neighbour.datetime_start < failed.datetime_complete and neighbour.state == TrialState.COMPLETE
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all(int((folder / f"step{t.number}").read_text()) == MAX_STEPS - 1 for t in complete)
    best = min(complete, key=lambda t: t.value)
    assert study.best_trial.number == best.number and study.best_value == best.value
    assert study.best_params == TRIALS[best.number]
    assert best.value < 0.05 and pruned.intermediate_values[0] > sweep_project.PRUNE_ABOVE


def test_a_sweep_on_the_embedded_cluster_prunes_mid_run_and_survives_a_failing_trial(local_cluster, tmp_path):
    check_sweep(run_sweep(None, tmp_path), tmp_path)
