"""A Ray Tune sweep on the cluster: 4 trials of the digits MLP, ASHA stopping the poor ones early.

    pip install "gpu-proxy[lightning,tune]"      # Ray Tune (pandas, pyarrow): not in gpu-proxy's own Ray
    python examples/ray_tune_sweep.py            # on the embedded cluster
    # on a remote cluster, as a Ray Job (docs/sweeps.md, "Ray Tune on the cluster"):
    ray job submit --address http://head:8265 --working-dir . -- python examples/ray_tune_sweep.py

Each trial is a Lightning ``fit`` through ``RemoteStrategy(cluster=None)``: inside a trial that is the
Ray cluster Tune runs on, and the trial's worker goes in the trial's own placement group, which
``trial_resources`` sizes (one bundle for the trainable, one per worker). ``TuneReportCallback``
reports ``val_loss`` and a checkpoint after every validation; a trial Tune restores (PBT, a retried
failure) resumes from ``checkpoint_path()``.
"""
import time

import lightning as L
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from examples.lightning_digits import DigitsClassifier, DigitsData
from gpu_proxy_lightning import RemoteStrategy
from gpu_proxy_lightning.tune import TuneReportCallback, checkpoint_path, trial_resources

MAX_EPOCHS = 4
WORKERS, CPUS_PER_WORKER = 1, 0.5  # a trial: 0.5 CPU for the trainable + 1 worker of 0.5 CPU


def train_digits(config: dict) -> None:
    trainer = L.Trainer(
        strategy=RemoteStrategy(num_workers=WORKERS, resources_per_worker={"CPU": CPUS_PER_WORKER}),
        accelerator="cpu", max_epochs=MAX_EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[TuneReportCallback(metrics=["val_loss", "val_acc"], on="validation_end")])
    trainer.fit(DigitsClassifier(hidden=config["hidden"], lr=config["lr"]), datamodule=DigitsData(),
                ckpt_path=checkpoint_path())  # None unless Tune restores this trial


def main() -> None:
    started = time.monotonic()
    from gpu_proxy.clusters.local import default_local_cluster

    if not ray.is_initialized():  # run as a Ray Job, the cluster's Ray is there already
        default_local_cluster().start()
    tuner = tune.Tuner(
        tune.with_resources(train_digits, trial_resources(num_workers=WORKERS, cpus_per_worker=CPUS_PER_WORKER,
                                                          trainable_cpus=0.5)),
        param_space={"hidden": tune.choice([16, 64]), "lr": tune.grid_search([3e-2, 1e-2, 1e-3, 1e-5])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=ASHAScheduler(
            max_t=MAX_EPOCHS, grace_period=1, reduction_factor=2)),
        run_config=tune.RunConfig(name="digits", verbose=0),
    )
    results = tuner.fit()
    best = results.get_best_result()
    epochs = sorted(int(r.metrics["training_iteration"]) for r in results)
    print(f"best val_loss {best.metrics['val_loss']:.3f} (val_acc {best.metrics['val_acc']:.3f}) with "
          f"{best.config}; epochs per trial {epochs}; checkpoint {best.checkpoint.path}; "
          f"{time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
