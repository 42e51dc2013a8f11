"""A Ray Tune sweep of Keras trials on the cluster: 4 learning rates of the digits MLP, ASHA stopping the poor ones.

    pip install "gpu-proxy[keras,tune]"           # Ray Tune (pandas, pyarrow): not in gpu-proxy's own Ray
    python examples/ray_tune_sweep_keras.py       # on the embedded cluster
    # on a remote cluster, as a Ray Job (docs/sweeps.md, "Ray Tune on the cluster"):
    ray job submit --address http://head:8265 --working-dir . -- python examples/ray_tune_sweep_keras.py

Each trial is a Keras ``fit`` through ``RemoteFit(cluster=None)``: inside a trial that is the Ray
cluster Tune runs on, and the trial's worker goes in the trial's own placement group, which
``trial_resources`` sizes (one bundle for the trainable, one per worker). ``TuneReportCallback``, a
home callback, reports each epoch's ``val_loss`` and ``val_accuracy`` with a checkpoint of the model;
a trial Tune restores (PBT, a retried failure) goes on from it with ``restore_checkpoint``.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import time  # noqa: E402

import keras  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from gpu_proxy_keras import RemoteFit  # noqa: E402
from gpu_proxy_keras.tune import TuneReportCallback, restore_checkpoint, trial_resources  # noqa: E402

EPOCHS = 6
WORKERS, CPUS_PER_WORKER = 1, 0.5  # a trial: 0.5 CPU for the trainable + 1 worker of 0.5 CPU


def digits_model(lr: float) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def train_digits(config: dict) -> None:
    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split((digits.data / 16.0).astype("float32"),
                                                      digits.target.astype("int32"), test_size=0.2, random_state=0)
    model = digits_model(config["lr"])
    initial_epoch = restore_checkpoint(model)  # 0 unless Tune restores this trial
    remote = RemoteFit(model, num_workers=WORKERS, resources_per_worker={"CPU": CPUS_PER_WORKER},
                       home_callbacks=[TuneReportCallback(metrics=["val_loss", "val_accuracy"])])
    remote.fit(x_train, y_train, validation_data=(x_val, y_val), batch_size=64, epochs=EPOCHS,
               initial_epoch=initial_epoch, verbose=0)


def main() -> None:
    started = time.monotonic()
    from gpu_proxy.clusters.local import default_local_cluster

    if not ray.is_initialized():  # run as a Ray Job, the cluster's Ray is there already
        default_local_cluster().start()
    tuner = tune.Tuner(
        tune.with_resources(train_digits, trial_resources(num_workers=WORKERS, cpus_per_worker=CPUS_PER_WORKER,
                                                          trainable_cpus=0.5)),
        param_space={"lr": tune.grid_search([3e-2, 1e-2, 1e-3, 1e-5])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=ASHAScheduler(
            max_t=EPOCHS, grace_period=1, reduction_factor=2)),
        run_config=tune.RunConfig(name="digits-keras", verbose=0),
    )
    results = tuner.fit()
    best = results.get_best_result()
    model = digits_model(best.config["lr"])
    restore_checkpoint(model, best.checkpoint)  # the best trial's model, here
    epochs = sorted(int(r.metrics["training_iteration"]) for r in results)
    print(f"best val_loss {best.metrics['val_loss']:.3f} (val_accuracy {best.metrics['val_accuracy']:.3f}) with "
          f"{best.config}; epochs per trial {epochs}; {model.count_params()} weights restored from "
          f"{best.checkpoint.path}; {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
