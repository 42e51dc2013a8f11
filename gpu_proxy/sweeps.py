"""Hyperparameter sweeps driven from home: an Optuna study whose trials are remote runs.

``optimize(study, objective, n_trials=8, n_concurrent=2)`` is ``study.optimize(objective,
n_trials, n_jobs=n_concurrent)`` with what remote trials need on top:

- Ctrl-C stops every trial cleanly. Optuna runs concurrent trials on threads, and Ctrl-C reaches
  only the main thread, where ``study.optimize`` would wait for every running trial to finish
  (minutes of GPU time). Here the study runs on a thread of its own; the main thread waits, and on
  Ctrl-C asks every run this process executes to stop at its next step (a second Ctrl-C aborts them),
  starts no further trial, and raises ``KeyboardInterrupt`` once all have ended.
- A trial's failure is that trial's (``FAIL`` in the study) and the sweep goes on; Optuna's own
  default (the first failure ends ``optimize``) is ``catch=()``.

Everything else is Optuna's: samplers, pruners, storages (in-memory, SQLite, a database URL),
``load_if_exists`` to resume a study, heartbeats to fail the trials a killed home left running.
The objective is written as for a local run; pruning a remote Lightning trial mid-run is
``HomeCallback(PyTorchLightningPruningCallback(trial, monitor=...))`` (gpu_proxy_lightning).
Several trials at once on one cluster need the cluster to hold all their workers; a trial whose
workers do not fit waits for another's to be freed (``gpu_proxy/runs/pool.py``).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

from gpu_proxy.errors import ConfigurationError

if TYPE_CHECKING:
    import optuna

WAIT_POLL_S = 0.2  # how often the main thread wakes to let Ctrl-C in and to stop runs started since


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C at home: raised on the trials' threads so that no new trial starts."""


def optimize(study: "optuna.Study", objective: Callable[["optuna.Trial"], Any], n_trials: int,
             n_concurrent: int = 1, catch: Sequence[type[Exception]] | None = None,
             **optimize_kwargs: Any) -> None:
    """Run ``n_trials`` trials of ``objective``, ``n_concurrent`` at a time (see the module docstring).

    Args:
        study: an Optuna study (any storage).
        objective: ``objective(trial) -> value``, as for ``study.optimize``; it fits remotely.
        n_trials: how many trials this call runs (as ``study.optimize``); to resume a study up to a
            total, pass the total less the trials already finished.
        n_concurrent: trials at once; each holds its own workers on the cluster.
        catch: exceptions that fail only their trial; default ``(Exception,)``: every failure.
        **optimize_kwargs: passed to ``study.optimize`` (``timeout``, ``callbacks``, ...).
    """
    for name, value in (("n_trials", n_trials), ("n_concurrent", n_concurrent)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"optimize({name}={value!r}): give a whole number >= 1.")
    if not callable(objective):
        raise ConfigurationError(f"optimize(objective={objective!r}): give a function of one Optuna trial.")
    if "n_jobs" in optimize_kwargs:
        raise ConfigurationError("optimize(n_jobs=...): use n_concurrent=, the number of trials at once.")
    interrupted = threading.Event()

    def trial(t: "optuna.Trial") -> Any:
        if interrupted.is_set():  # asked before this trial began: it does not start
            t.study.stop()
            raise SweepInterrupted("the sweep was interrupted at home")
        return objective(t)

    outcome: dict[str, BaseException] = {}

    def run_study() -> None:
        try:
            study.optimize(trial, n_trials=n_trials, n_jobs=n_concurrent,
                           catch=tuple(catch) if catch is not None else (Exception,), **optimize_kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run_study, name="gpu-proxy-sweep", daemon=True)
    thread.start()
    try:
        while thread.is_alive():  # a join that lets Ctrl-C in
            thread.join(WAIT_POLL_S)
    except KeyboardInterrupt:
        interrupted.set()
        _stop_trials(thread)
        raise SweepInterrupted("the sweep was interrupted at home; its running trials were stopped") from None
    if "error" in outcome and not isinstance(outcome["error"], SweepInterrupted):
        raise outcome["error"]


def _stop_trials(thread: threading.Thread) -> None:
    """Stop every run this process executes, until the study's thread ends; Ctrl-C again aborts them."""
    asked: dict[int, int] = {}  # id(RunControl) -> stop requests sent
    aborting = False
    while thread.is_alive():
        try:
            for control in _active_runs():
                wanted = 2 if aborting else 1  # a second request aborts the run (RunControl)
                while asked.get(id(control), 0) < wanted:
                    asked[id(control)] = asked.get(id(control), 0) + 1
                    control.request_stop("the sweep was interrupted at home (Ctrl-C)")
            thread.join(WAIT_POLL_S)
        except KeyboardInterrupt:
            aborting = True


def _active_runs() -> list[Any]:
    from gpu_proxy.clusters.base import all_active_runs

    return all_active_runs()
