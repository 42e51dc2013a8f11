"""What RemoteFit costs over a local ``model.fit`` on the same job, measured side by side.

Two job sizes of the digits MLP (one worker, batch 64): a tiny one (--epochs, default 5: well under
a second locally) and a realistic one (--long-epochs, default 40 epochs on 4x the digits: several
seconds locally). Each is run two ways, alternating, in one process whose embedded Ray cluster is
already up (one untimed RemoteFit warms it: cluster start, worker process, TensorFlow import):
  local       - model.fit here (the reference)
  remote_fit  - RemoteFit(model, num_workers=1).fit on the embedded cluster

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


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def measure(x, y, epochs: int, repeats: int) -> tuple[float, float, list[float], list[float]]:
    job = dict(batch_size=64, epochs=epochs, validation_split=0.2, verbose=0)
    times: dict[str, list[float]] = {"local": [], "remote_fit": []}
    for _ in range(repeats):
        model = make_model()
        start = time.perf_counter()
        model.fit(x, y, **job)
        times["local"].append(time.perf_counter() - start)
        model = make_model()
        start = time.perf_counter()
        RemoteFit(model).fit(x, y, **job)
        times["remote_fit"].append(time.perf_counter() - start)
    return (statistics.median(times["local"]), statistics.median(times["remote_fit"]),
            times["local"], times["remote_fit"])


def report(title: str, local: float, remote: float, local_runs: list[float],
           remote_runs: list[float]) -> None:
    print(title)
    print(f"  local model.fit      {local:7.2f} s   {['%.2f' % t for t in local_runs]}")
    print(f"  RemoteFit 1 worker   {remote:7.2f} s   {['%.2f' % t for t in remote_runs]}")
    print(f"  ratio remote_fit / local: {remote / local:.2f}  (target <= 1.3)")
    print(f"  fixed cost per call: {remote - local:.2f} s")


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

    warm = dict(batch_size=64, epochs=1, validation_split=0.2, verbose=0)
    RemoteFit(make_model()).fit(x, y, **warm)  # warm-up, untimed
    make_model().fit(x, y, **warm)
    report(f"tiny job: digits MLP, {len(x)} samples, {args.epochs} epochs, batch 64, 1 worker, "
           f"median of {args.repeats}, cluster up", *measure(x, y, args.epochs, args.repeats))
    report(f"realistic job: digits MLP, {len(x_long)} samples, {args.long_epochs} epochs, batch 64, "
           f"1 worker, median of {args.long_repeats}, cluster up",
           *measure(x_long, y_long, args.long_epochs, args.long_repeats))


if __name__ == "__main__":
    main()
