"""An Optuna study whose trials are remote Lightning fits: 8 trials, 2 at a time, pruned mid-run.

    pip install gpu-proxy[optuna]
    python examples/optuna_sweep.py                          # the embedded cluster
    python examples/optuna_sweep.py http://head:8265         # a cluster by address
    python examples/optuna_sweep.py local sqlite:///sweep.db # a study that survives home restarting

The objective is the one you would write for a local sweep; two things differ: the Trainer's
strategy, and the pruning callback wrapped in HomeCallback, so that it runs here, beside the study,
on the metrics the run streams home (a pruned trial stops at its next step on every rank).
"""
import sys

import lightning as L
import optuna

from optuna_integration import PyTorchLightningPruningCallback

import gpu_proxy

from examples.lightning_digits import DigitsClassifier, DigitsData
from gpu_proxy.sweeps import optimize
from gpu_proxy_lightning import RemoteStrategy
from gpu_proxy_lightning.home_callbacks import HomeCallback

# One Cluster object for the trials and the sweep: on a metered one (RunPod) the sweep reads its cost.
CLUSTER = gpu_proxy.resolve_cluster(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "local" else None)
STORAGE = sys.argv[2] if len(sys.argv) > 2 else None  # None: in memory


def objective(trial: optuna.Trial) -> float:
    hidden = trial.suggest_int("hidden", 16, 128, log=True)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trainer = L.Trainer(
        strategy=RemoteStrategy(cluster=CLUSTER, num_workers=1), accelerator="cpu", max_epochs=5,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[HomeCallback(PyTorchLightningPruningCallback(trial, monitor="val_loss"))])
    trainer.fit(DigitsClassifier(hidden=hidden, lr=lr), datamodule=DigitsData())
    return trainer.callback_metrics["val_acc"].item()


def main() -> None:
    study = optuna.create_study(study_name="digits", storage=STORAGE, load_if_exists=True, direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    spent = optimize(study, objective, n_trials=8, n_concurrent=2, cluster=CLUSTER)  # None: not metered
    pruned = len(study.get_trials(states=(optuna.trial.TrialState.PRUNED,)))
    print(f"best val_acc {study.best_value:.3f} with {study.best_params}; {pruned} of {len(study.trials)} pruned"
          + (f"; ${spent:.2f} spent" if spent is not None else ""))


if __name__ == "__main__":
    main()
