"""A user's Keras project: small models, a custom layer registered for serialization, tiny data."""
from __future__ import annotations

import keras
import numpy as np


@keras.saving.register_keras_serializable(package="keras_project")
class Scale(keras.layers.Layer):
    """Multiplies its input by one trainable scalar: a custom layer that must travel by value."""

    def build(self, input_shape):
        self.factor = self.add_weight(shape=(), initializer="ones", name="factor")

    def call(self, inputs):
        return inputs * self.factor


def blobs(n: int = 128, features: int = 8, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable Gaussian blobs: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n).astype("int32")
    centers = rng.normal(scale=3.0, size=(classes, features))
    x = (centers[y] + rng.normal(size=(n, features))).astype("float32")
    return x, y


def mlp(features: int = 8, classes: int = 3, seed: int = 1, with_custom_layer: bool = False,
        optimizer: str = "adam") -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((features,)), keras.layers.Dense(16, activation="relu")]
    if with_custom_layer:
        layers.append(Scale())
    layers.append(keras.layers.Dense(classes, activation="softmax"))
    model = keras.Sequential(layers)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def two_input_model(seed: int = 2) -> keras.Model:
    """A functional model whose inputs are a dict of named arrays."""
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(3, activation="softmax")(hidden))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def blobs_dataset(batch_size: int = 32):
    """Builds a tf.data.Dataset of the blobs: what a user passes as a function, called on each worker."""
    import tensorflow as tf

    x, y = blobs(n=96)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


class BlobBatches(keras.utils.PyDataset):
    """A user's PyDataset: the blobs in fixed batches (the last one short)."""

    def __init__(self, n: int = 100, batch_size: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        self.x, self.y = blobs(n=n)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index: int):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[part], self.y[part]


def blob_batches() -> BlobBatches:
    """Builds the PyDataset: what a user passes as a function, called on each worker."""
    return BlobBatches()


@keras.saving.register_keras_serializable(package="keras_project")
class CountingMLP(keras.Model):
    """A subclassed model whose predict_step and test_step count their batches in non-trainable
    variables: state that Keras' own predict/evaluate leave in the local model."""

    def __init__(self, classes: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.classes = classes
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(classes, activation="softmax")
        self.predicted_batches = keras.Variable(0.0, trainable=False, name="predicted_batches")
        self.tested_batches = keras.Variable(0.0, trainable=False, name="tested_batches")

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.out.build((input_shape[0], 16))

    def call(self, inputs):
        return self.out(self.hidden(inputs))

    def predict_step(self, data):
        self.predicted_batches.assign_add(1.0)
        return super().predict_step(data)

    def test_step(self, data):
        self.tested_batches.assign_add(1.0)
        return super().test_step(data)

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


def counting_mlp(features: int = 8, seed: int = 3) -> CountingMLP:
    keras.utils.set_random_seed(seed)
    model = CountingMLP()
    model.build((None, features))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
