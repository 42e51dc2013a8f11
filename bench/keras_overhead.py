"""What RemoteFit costs over a local ``model.fit`` on the same job, measured side by side.

One job (the digits MLP, one worker, --epochs epochs, batch 64) two ways, alternating, in one process
whose embedded Ray cluster is already up (one untimed RemoteFit warms it: cluster start, worker
process, TensorFlow import):
  local       - model.fit here (the reference)
  remote_fit  - RemoteFit(model, num_workers=1).fit on the embedded cluster

Each timed call starts from the same initial weights. Prints the medians and remote/local.

    python bench/keras_overhead.py [--repeats 5] [--epochs 5]
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
from sklearn.datasets import load_digits  # noqa: E402

from gpu_proxy_keras import RemoteFit  # noqa: E402


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    digits = load_digits()
    x, y = (digits.data / 16.0).astype("float32"), digits.target.astype("int32")
    job = dict(batch_size=64, epochs=args.epochs, validation_split=0.2, verbose=0)

    RemoteFit(make_model()).fit(x, y, **job)  # warm-up, untimed
    make_model().fit(x, y, **job)
    times: dict[str, list[float]] = {"local": [], "remote_fit": []}
    for _ in range(args.repeats):
        model = make_model()
        start = time.perf_counter()
        model.fit(x, y, **job)
        times["local"].append(time.perf_counter() - start)
        model = make_model()
        start = time.perf_counter()
        RemoteFit(model).fit(x, y, **job)
        times["remote_fit"].append(time.perf_counter() - start)
    local, remote = statistics.median(times["local"]), statistics.median(times["remote_fit"])
    print(f"job: digits MLP, {len(x)} samples, {args.epochs} epochs, batch 64, 1 worker, "
          f"median of {args.repeats}, cluster up")
    print(f"local model.fit      {local:7.2f} s   {['%.2f' % t for t in times['local']]}")
    print(f"RemoteFit 1 worker   {remote:7.2f} s   {['%.2f' % t for t in times['remote_fit']]}")
    print(f"ratio remote_fit / local: {remote / local:.2f}  (target <= 1.3)")
    print(f"fixed cost per call: {remote - local:.2f} s")


if __name__ == "__main__":
    main()
