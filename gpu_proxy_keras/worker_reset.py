"""What Keras keeps per process, put back in a pooled worker after each run.

A warm worker serves many runs (:mod:`gpu_proxy.runs.pool`); a run must find what a fresh process
has. Keras' global configuration (``keras.config``: floatx, epsilon, image data format, the global
dtype policy such as ``mixed_float16``, the epoch and step caps, and safe mode, which
``enable_unsafe_deserialization`` turns off) goes back to what it was when this worker first
imported Keras (``~/.keras/keras.json`` included). NumPy's seed is drawn afresh, and
after a run that called ``keras.utils.set_random_seed`` so are Python's, Keras' and its backend's:
a seed one run set never makes the next one repeat it.

Not reset: a model a pooled worker keeps to skip the next build (:mod:`.model_cache`), which
every run loads its own weights into; Keras' layer-name counters (a run's layer names may differ
from a fresh process's; clearing them would drop the kept model); a seed a run set through
TensorFlow or torch directly (``tf.random.set_seed``), which Keras does not see; and the flags for
flash attention, interactive logging and traceback filtering, which change no result.
"""
from __future__ import annotations

import os

import keras
import numpy
from keras.src.backend.common import global_state  # private: behind gpu_proxy.version_gates' Keras gate
from keras.src.utils import rng_utils

from gpu_proxy.runs.process_state import register_reset

_AT_IMPORT = {
    "floatx": keras.config.floatx(),
    "epsilon": keras.config.epsilon(),
    "image_data_format": keras.config.image_data_format(),
    "dtype_policy": keras.config.dtype_policy().name,
    "max_epochs": keras.config.max_epochs(),
    "max_steps_per_epoch": keras.config.max_steps_per_epoch(),
}
# `keras.config.enable_unsafe_deserialization()` has no public inverse; a run's must not outlive it.
_SAFE_MODE_AT_IMPORT = global_state.get_global_attribute("safe_mode_saving")


def reset_keras() -> None:
    keras.config.set_floatx(_AT_IMPORT["floatx"])
    keras.config.set_epsilon(_AT_IMPORT["epsilon"])
    keras.config.set_image_data_format(_AT_IMPORT["image_data_format"])
    keras.config.set_dtype_policy(_AT_IMPORT["dtype_policy"])
    keras.config.set_max_epochs(_AT_IMPORT["max_epochs"])
    keras.config.set_max_steps_per_epoch(_AT_IMPORT["max_steps_per_epoch"])
    numpy.random.seed()  # from the OS's entropy, as a fresh process
    if rng_utils.get_random_seed() is not None:  # a run seeded Keras, its backend and Python
        # Keras has no public "unseeded": a seed from the OS's entropy is as unpredictable as none.
        # Only then: the next fit after a new backend seed takes ~25 ms longer (measured).
        keras.utils.set_random_seed(int.from_bytes(os.urandom(4), "little"))
        global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, None)  # unseeded again, as a fresh process
    global_state.set_global_attribute("safe_mode_saving", _SAFE_MODE_AT_IMPORT)


register_reset(reset_keras)
