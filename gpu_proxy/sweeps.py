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
- On a metered cluster (``cluster=``, the object the trials run on) each trial's share of the spend
  is its user attribute ``cost_usd`` and ``optimize`` returns (and prints) the sweep's
  (``gpu_proxy/sweep_cost.py``). Once the cluster's ``budget_usd`` is spent no trial starts; the
  trials its meter stopped are ``FAIL`` (``RunStoppedError``), and any run the cluster stops ends the
  sweep the same way.

Everything else is Optuna's: samplers, pruners, storages (in-memory, SQLite, a database URL),
``load_if_exists`` to resume a study, heartbeats to fail the trials a killed home left running.
The objective is written as for a local run; pruning a remote Lightning trial mid-run is
``HomeCallback(PyTorchLightningPruningCallback(trial, monitor=...))`` (gpu_proxy_lightning), a Keras
one ``RemoteFit(model, home_callbacks=[KerasPruningCallback(trial, monitor)])``.
Several trials at once on one cluster need the cluster to hold all their workers; a trial whose
workers do not fit waits for another's to be freed (``gpu_proxy/runs/pool.py``).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Sequence

from gpu_proxy.clusters.base import Cluster
from gpu_proxy.errors import ConfigurationError, GpuProxyError, RunStoppedError
from gpu_proxy.sweep_cost import CostLedger

if TYPE_CHECKING:
    import optuna

WAIT_POLL_S = 0.2  # how often the main thread wakes to let Ctrl-C in and to stop runs started since


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C at home: raised on the trials' threads so that no new trial starts."""


class BudgetSpent(GpuProxyError):
    """The trial did not start: the cluster's ``budget_usd`` is spent (the sweep ends with it)."""


def optimize(study: "optuna.Study", objective: Callable[["optuna.Trial"], Any], n_trials: int,
             n_concurrent: int = 1, catch: Sequence[type[Exception]] | None = None,
             cluster: Cluster | None = None, **optimize_kwargs: Any) -> float | None:
    """Run ``n_trials`` trials of ``objective``, ``n_concurrent`` at a time (see the module docstring).

    Args:
        study: an Optuna study (any storage).
        objective: ``objective(trial) -> value``, as for ``study.optimize``; it fits remotely.
        n_trials: how many trials this call runs (as ``study.optimize``); to resume a study up to a
            total, pass the total less the trials already finished.
        n_concurrent: trials at once; each holds its own workers on the cluster.
        catch: exceptions that fail only their trial; default ``(Exception,)``: every failure.
        cluster: the cluster object the objective's runs use; when it meters cost (RunPod), each
            trial's share is its user attribute ``cost_usd`` and its ``budget_usd`` ends the sweep.
        **optimize_kwargs: passed to ``study.optimize`` (``timeout``, ``callbacks``, ...).

    Returns:
        What the sweep cost in USD on a metered ``cluster``; None otherwise.
    """
    for name, value in (("n_trials", n_trials), ("n_concurrent", n_concurrent)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"optimize({name}={value!r}): give a whole number >= 1.")
    if not callable(objective):
        raise ConfigurationError(f"optimize(objective={objective!r}): give a function of one Optuna trial.")
    if "n_jobs" in optimize_kwargs:
        raise ConfigurationError("optimize(n_jobs=...): use n_concurrent=, the number of trials at once.")
    if cluster is not None and not isinstance(cluster, Cluster):
        raise ConfigurationError(f"optimize(cluster={cluster!r}): give the Cluster object the objective's runs "
                                 "use, e.g. cluster = gpu_proxy.resolve_cluster('my-runpod'), passed to both.")
    interrupted = threading.Event()
    ledger = CostLedger(cluster)

    def trial(t: "optuna.Trial") -> Any:
        if interrupted.is_set():  # asked before this trial began: it does not start
            t.study.stop()
            raise SweepInterrupted("the sweep was interrupted at home")
        if ledger.budget_spent():
            t.study.stop()
            raise BudgetSpent(f"not started: {cluster!r} reached its budget_usd")
        ledger.trial_started(t.number)
        try:
            return objective(t)
        except RunStoppedError:
            t.study.stop()  # the cluster stopped the run (its budget spent, a signal): no further trial
            raise
        finally:
            share = ledger.trial_ended(t.number)
            if share is not None:
                t.set_user_attr("cost_usd", round(share, 6))

    outcome: dict[str, BaseException] = {}
    # Waited on, not thread.join(): a Ctrl-C that interrupts join() leaves is_alive() False while the
    # thread still runs (CPython releases the thread's own lock on the way out, bpo-45274).
    ended = threading.Event()

    def run_study() -> None:
        try:
            study.optimize(trial, n_trials=n_trials, n_jobs=n_concurrent,
                           catch=tuple(catch) if catch is not None else (Exception,), **optimize_kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = error
        finally:
            ended.set()

    threading.Thread(target=run_study, name="gpu-proxy-sweep", daemon=True).start()
    try:
        while not ended.wait(WAIT_POLL_S):  # a wait that lets Ctrl-C in
            ledger.sample()
    except KeyboardInterrupt:
        interrupted.set()
        _stop_trials(ended)
        _report_cost(ledger, study)
        raise SweepInterrupted("the sweep was interrupted at home; its running trials were stopped") from None
    total = _report_cost(ledger, study)
    if "error" in outcome and not isinstance(outcome["error"], SweepInterrupted):
        raise outcome["error"]
    return total


def _report_cost(ledger: CostLedger, study: "optuna.Study") -> float | None:
    total = ledger.total()
    if total is not None:
        print(f"gpu-proxy: the sweep cost ${total:.2f} ({len(study.trials)} trials in the study; each trial's "
              "share is its user attribute cost_usd)", flush=True)
    return total


def _stop_trials(ended: threading.Event) -> None:
    """Stop every run this process executes until the study has ended; Ctrl-C again aborts them."""
    asked: dict[int, int] = {}  # id(RunControl) -> stop requests sent
    aborting = False
    while not ended.is_set():
        try:
            for control in _active_runs():
                wanted = 2 if aborting else 1  # a second request aborts the run (RunControl)
                while asked.get(id(control), 0) < wanted:
                    asked[id(control)] = asked.get(id(control), 0) + 1
                    control.request_stop("the sweep was interrupted at home (Ctrl-C)")
            ended.wait(WAIT_POLL_S)
        except KeyboardInterrupt:
            aborting = True


def _active_runs() -> list[Any]:
    from gpu_proxy.clusters.base import all_active_runs

    return all_active_runs()
