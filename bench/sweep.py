"""8 short Optuna trials, 2 at a time on the embedded cluster, against the same 8 one after another locally.

Each trial is a Lightning fit of the digits MLP (examples/lightning_digits.py), one worker, CPU,
a few seconds long; the trials' parameters are fixed (enqueued), so both ways do the same work.

  sweep  - gpu_proxy.sweeps.optimize(study, objective, n_trials=8, n_concurrent=2), RemoteStrategy
  local  - the same objective with plain local Lightning (no strategy), one trial after another

The embedded cluster and two worker groups are warmed first by two untimed trials (a sweep usually
follows a first fit; warm workers are what makes a short trial cost ~1 s of overhead). The ratio
printed is sweep / local wall time; the target is <= 0.7.

    python bench/sweep.py [--epochs 12]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import optuna  # noqa: E402

from examples.lightning_digits import DigitsClassifier, DigitsData  # noqa: E402
from gpu_proxy.sweeps import optimize  # noqa: E402
from gpu_proxy_lightning import RemoteStrategy  # noqa: E402

TRIALS = [{"hidden": h, "lr": lr} for h in (32, 64, 96, 128) for lr in (3e-3, 1e-2)]
TRAINER_ARGS = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)


def make_objective(remote: bool, epochs: int):
    def objective(trial: optuna.Trial) -> float:
        hidden, lr = trial.suggest_int("hidden", 16, 128), trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        strategy = dict(strategy=RemoteStrategy(num_workers=1)) if remote else {}
        trainer = L.Trainer(max_epochs=epochs, **strategy, **TRAINER_ARGS)
        trainer.fit(DigitsClassifier(hidden=hidden, lr=lr), datamodule=DigitsData())
        return trainer.callback_metrics["val_acc"].item()
    return objective


def study_of(trials: list[dict]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for params in trials:
        study.enqueue_trial(params)
    return study


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize(study_of(TRIALS[:2]), make_objective(True, 1), n_trials=2, n_concurrent=2)  # warm, untimed

    started = time.perf_counter()
    sweep = study_of(TRIALS)
    optimize(sweep, make_objective(True, args.epochs), n_trials=len(TRIALS), n_concurrent=2)
    sweep_s = time.perf_counter() - started

    started = time.perf_counter()
    local = study_of(TRIALS)
    local.optimize(make_objective(False, args.epochs), n_trials=len(TRIALS))
    local_s = time.perf_counter() - started

    print(f"{len(TRIALS)} trials, {args.epochs} epochs each: sweep (2 concurrent, remote) {sweep_s:.1f} s, "
          f"local one after another {local_s:.1f} s ({local_s / len(TRIALS):.1f} s a trial); "
          f"ratio {sweep_s / local_s:.2f}x (target <= 0.7x)")
    print(f"best val_acc: sweep {sweep.best_value:.3f}, local {local.best_value:.3f}")


if __name__ == "__main__":
    main()
