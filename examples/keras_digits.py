"""Train an MLP on scikit-learn's bundled digits data with 2 Keras workers on the embedded Ray cluster.

    python examples/keras_digits.py

Nothing is downloaded; the only change from local training is ``RemoteFit(model, ...).fit`` in
place of ``model.fit``. The two workers train under TensorFlow's MultiWorkerMirroredStrategy.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from gpu_proxy_keras import RemoteFit  # noqa: E402


def main() -> None:
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    remote = RemoteFit(model, num_workers=2)
    history = remote.fit(x_train, y_train, batch_size=64, epochs=8, validation_data=(x_val, y_val), verbose=2)

    # The local model now holds the trained weights: evaluate it right here, and on the two workers
    # (each evaluates half of the samples; the metrics are combined as if one had seen them all).
    _, local_accuracy = model.evaluate(x_val, y_val, verbose=0)
    _, remote_accuracy = remote.evaluate(x_val, y_val, verbose=0)
    print(f"final validation accuracy: {history.history['val_accuracy'][-1]:.3f} "
          f"(local model: {local_accuracy:.3f}, evaluated on 2 workers: {remote_accuracy:.3f})")


if __name__ == "__main__":
    main()
