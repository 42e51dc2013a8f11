"""A user's script on the JAX backend, run by tests/keras/test_keras_jax.py in its own process (the test
process has Keras on TensorFlow, and a Keras backend is fixed at import).

    python -m tests.keras_project.jax_fit reference   one process, 2 JAX devices, DataParallel
    python -m tests.keras_project.jax_fit remote      RemoteFit(num_workers=2) on an embedded cluster

Prints one JSON line: the History and the final weights.
"""
import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import numpy as np  # noqa: E402

FIT = dict(batch_size=16, epochs=3, shuffle=False, validation_split=0.25)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=64).astype("int32")
    x = (rng.normal(scale=3.0, size=(3, 8))[y] + rng.normal(size=(64, 8))).astype("float32")
    return x, y


def model() -> keras.Model:
    keras.utils.set_random_seed(1)
    built = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    built.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return built


def main(mode: str) -> None:
    x, y = data()
    if mode == "reference":
        devices = keras.distribution.list_devices()
        assert len(devices) == 2, devices  # XLA_FLAGS=--xla_force_host_platform_device_count=2
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        trained = model()
        history = trained.fit(x, y, verbose=0, **FIT)
    else:
        from gpu_proxy_keras import RemoteFit

        trained = model()
        history = RemoteFit(trained, num_workers=2).fit(x, y, verbose=0, **FIT)
        assert trained.history is history and history.model is trained
    print(json.dumps({"history": history.history, "epoch": history.epoch,
                      "iterations": int(np.asarray(trained.optimizer.iterations)),
                      "weights": [np.asarray(w).tolist() for w in trained.get_weights()]}))


if __name__ == "__main__":
    main(sys.argv[1])
