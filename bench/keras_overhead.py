"""What RemoteFit costs over a local ``model.fit`` on the same job, measured side by side.

Two job sizes of the digits MLP (one worker, batch 64): a tiny one (--epochs, default 5: well under
a second locally) and a realistic one (--long-epochs, default 40 epochs on 4x the digits: several
seconds locally). Each is run two ways, alternating, in one process whose embedded Ray cluster is
already up (one untimed RemoteFit warms it: cluster start, worker process, TensorFlow import):
  local       - model.fit here (the reference)
  remote_fit  - RemoteFit(model, num_workers=1).fit on the embedded cluster
  by_address  - the same on a `ray start --head` cluster on loopback given by address (the remote
                path: the cluster's run server and its warm workers)

Each timed call starts from the same initial weights. Prints, per job size, the medians, the ratio
remote/local and the fixed cost (remote - local) in seconds.

    python bench/keras_overhead.py [--repeats 5] [--epochs 5] [--long-epochs 40] [--long-repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from gpu_proxy_keras import RemoteFit  # noqa: E402

ADDRESS_ENV = "GPU_PROXY_BENCH_ADDRESS"


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def measure(x, y, epochs: int, repeats: int) -> tuple[float, float, list[float], list[float]]:
    job = dict(batch_size=64, epochs=epochs, validation_split=0.2, verbose=0)
    times: dict[str, list[float]] = {"local": [], "remote_fit": [], "by_address": []}
    for _ in range(repeats):
        model = make_model()
        start = time.perf_counter()
        model.fit(x, y, **job)
        times["local"].append(time.perf_counter() - start)
        for mode, cluster in (("remote_fit", None), ("by_address", os.environ[ADDRESS_ENV])):
            model = make_model()
            start = time.perf_counter()
            RemoteFit(model, cluster=cluster).fit(x, y, **job)
            times[mode].append(time.perf_counter() - start)
    return {mode: (statistics.median(runs), runs) for mode, runs in times.items()}


def report(title: str, results: dict) -> None:
    print(title)
    local = results["local"][0]
    for mode, label in (("local", "local model.fit"), ("remote_fit", "RemoteFit, embedded"),
                        ("by_address", "RemoteFit, by address")):
        median, runs = results[mode]
        print(f"  {label:22} {median:7.2f} s   {['%.2f' % t for t in runs]}")
    for mode in ("remote_fit", "by_address"):
        print(f"  ratio {mode} / local: {results[mode][0] / local:.2f}  (target <= 1.3); "
              f"fixed cost per call {results[mode][0] - local:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--long-epochs", type=int, default=40)
    parser.add_argument("--long-repeats", type=int, default=3)
    args = parser.parse_args()
    digits = load_digits()
    x, y = (digits.data / 16.0).astype("float32"), digits.target.astype("int32")
    # The realistic job: the same model on 4x the samples (7188), so each epoch does real work.
    x_long, y_long = np.concatenate([x] * 4), np.concatenate([y] * 4)

    from tests.support.ray_head import start_ray_head, stop_ray_head

    head = start_ray_head(num_cpus=2)
    os.environ[ADDRESS_ENV] = head.dashboard_url
    os.environ["RAY_AUTH_TOKEN_PATH"] = head.token_path  # where RayCluster finds the token (as a user's would)
    try:
        warm = dict(batch_size=64, epochs=1, validation_split=0.2, verbose=0)
        RemoteFit(make_model()).fit(x, y, **warm)  # warm-up, untimed
        RemoteFit(make_model(), cluster=head.dashboard_url).fit(x, y, **warm)
        make_model().fit(x, y, **warm)
        report(f"tiny job: digits MLP, {len(x)} samples, {args.epochs} epochs, batch 64, 1 worker, "
               f"median of {args.repeats}, clusters up", measure(x, y, args.epochs, args.repeats))
        report(f"realistic job: digits MLP, {len(x_long)} samples, {args.long_epochs} epochs, batch 64, "
               f"1 worker, median of {args.long_repeats}, clusters up",
               measure(x_long, y_long, args.long_epochs, args.long_repeats))
    finally:
        stop_ray_head(head)


if __name__ == "__main__":
    main()
