"""Checks made at home, before any worker starts: each error names the bad value and the fix."""
from __future__ import annotations

import inspect
import math
from typing import Any

import keras
import numpy as np

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs.heartbeat import MIN_GRACE_S
from gpu_proxy_keras import data_sources, jax_distribution

MULTI_WORKER_BACKENDS = ("tensorflow", "jax")


def check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise ConfigurationError(f"RemoteFit needs a keras.Model; got {type(model).__name__}.")


def check_compiled(model: keras.Model, method: str) -> None:
    """fit and evaluate need a compiled model, as Keras' own do; predict does not."""
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", False):
        raise ConfigurationError(
            f"The model {model.name!r} is not compiled. Call model.compile(optimizer=..., loss=...) "
            f"before RemoteFit(...).{method}(...), as Keras' own {method} requires (predict needs no compile).")


def check_workers(num_workers: Any, backend: str) -> None:
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ConfigurationError(f"num_workers={num_workers!r}: pass a whole number >= 1.")
    if num_workers > 1 and backend not in MULTI_WORKER_BACKENDS:
        raise ConfigurationError(
            f"num_workers={num_workers} with the {backend!r} Keras backend: gpu_proxy_keras runs "
            f"several workers only with {MULTI_WORKER_BACKENDS}. Use num_workers=1 (one worker may "
            "hold several GPUs), or build the model with KERAS_BACKEND=tensorflow.")


def check_data(name: str, value: Any, required: bool = False,
               storage_options: dict[str, Any] | None = None) -> None:
    """Data must be picklable values (numpy arrays, dicts/lists of them), a function that builds it,
    or the URL of a .npy/.npz file the workers read (see data_sources.py)."""
    if value is None:
        if required:
            raise ConfigurationError(f"{name} is required.")
        return
    if isinstance(value, str):
        data_sources.check_file(name, value, storage_options)
        return
    if inspect.isgenerator(value) or (hasattr(value, "__next__") and not hasattr(value, "__len__")):
        raise ConfigurationError(
            f"{name} is a {type(value).__name__} (an iterator), which cannot be sent to remote workers. "
            f"Pass a function that creates it instead, e.g. {name}=lambda: make_batches(); every worker "
            "calls it.")
    if type(value).__module__.startswith("tensorflow") and "Dataset" in type(value).__name__:
        raise ConfigurationError(
            f"{name} is a {type(value).__name__}, which cannot be sent to remote workers. Pass the "
            f"function that builds it instead, e.g. {name}=lambda: make_dataset() (or "
            f"functools.partial(make_dataset, ...)); every worker calls it and tf.distribute shards it.")
    if isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            check_data(f"{name}[{index}]", item, storage_options=storage_options)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_data(f"{name}[{key!r}]", item, storage_options=storage_options)


def check_fit(x: Any, epochs: Any, initial_epoch: Any, validation_split: Any,
              callbacks: list[Any], num_workers: int) -> None:
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ConfigurationError(f"epochs={epochs!r}: pass a whole number >= 1.")
    if not isinstance(initial_epoch, int) or not 0 <= initial_epoch < epochs:
        raise ConfigurationError(f"initial_epoch={initial_epoch!r} must be a whole number in [0, epochs={epochs}).")
    if not 0.0 <= validation_split < 1.0:
        raise ConfigurationError(f"validation_split={validation_split!r} must be in [0, 1).")
    if validation_split and callable(x):
        raise ConfigurationError(
            "validation_split needs array data, but x is a function that builds the data on the "
            "workers; pass validation_data=... (arrays or another such function) instead.")
    for index, callback in enumerate(callbacks):
        if not isinstance(callback, keras.callbacks.Callback):
            raise ConfigurationError(f"callbacks[{index}] is a {type(callback).__name__}, not a "
                                     "keras.callbacks.Callback.")
        if num_workers > 1 and isinstance(callback, keras.callbacks.BackupAndRestore):
            raise ConfigurationError(
                "BackupAndRestore with num_workers > 1: its restore would run from rank 0's files "
                "only and the workers would diverge. Use num_workers=1 with it.")


def check_checkpoints(checkpoint_dir: Any, max_failures: Any, run_name: Any) -> None:
    if checkpoint_dir is not None and (not isinstance(checkpoint_dir, str) or not checkpoint_dir):
        raise ConfigurationError(f"checkpoint_dir={checkpoint_dir!r}: pass an fsspec URL or a path, "
                                 "e.g. 's3://bucket/runs' or '/data/runs'.")
    if not isinstance(max_failures, int) or isinstance(max_failures, bool) or max_failures < 0:
        raise ConfigurationError(f"max_failures={max_failures!r}: pass a whole number >= 0.")
    if max_failures and checkpoint_dir is None:
        raise ConfigurationError(
            f"max_failures={max_failures} needs checkpoint_dir=...: a restart resumes from the newest "
            "committed epoch, and without checkpoint_dir nothing is committed.")
    if run_name is not None:
        if checkpoint_dir is None:
            raise ConfigurationError(f"run_name={run_name!r} names a run's checkpoint folder; pass "
                                     "checkpoint_dir=... too.")
        if not isinstance(run_name, str) or not run_name or "/" in run_name or run_name in (".", ".."):
            raise ConfigurationError(f"run_name={run_name!r}: pass a non-empty name without '/'.")


def check_home_grace(home_grace_s: Any) -> None:
    if home_grace_s is None:
        return
    if not isinstance(home_grace_s, (int, float)) or isinstance(home_grace_s, bool) or math.isnan(home_grace_s) \
            or home_grace_s < MIN_GRACE_S:
        raise ConfigurationError(f"home_grace_s={home_grace_s!r}: give seconds as a number >= {MIN_GRACE_S:g} "
                                 "(home beats every few seconds), e.g. 300, or None to never stop.")


def check_jax_fit(data: dict[str, Any], kwargs: dict[str, Any], num_workers: int,
                  storage_options: dict[str, Any] | None) -> None:
    """Several JAX workers: arrays (or .npy/.npz URLs) whose every global batch splits evenly
    across the workers (see jax_distribution.py)."""
    for name in ("x", "y", "validation_data", "sample_weight"):
        value = data.get(name)
        if callable(value) or isinstance(value, keras.utils.PyDataset):
            raise ConfigurationError(
                f"{name} is a {type(value).__name__}: with the JAX backend on {num_workers} workers, "
                "gpu_proxy_keras splits every global batch across the workers itself, so it needs "
                f"arrays or .npy/.npz URLs. Pass those, or use num_workers=1 (one worker may hold several "
                "GPUs), or the tensorflow backend.")
    batch_size = kwargs.get("batch_size") or 32
    counts = {"batch_size": (batch_size, data_sources.sample_count(data["x"], storage_options))}
    if kwargs.get("validation_split") and counts["batch_size"][1] is not None:
        total = counts["batch_size"][1]
        train = int(np.floor(total * (1.0 - kwargs["validation_split"])))
        counts = {"batch_size": (batch_size, train),
                  "validation_batch_size": (kwargs.get("validation_batch_size") or batch_size, total - train)}
    elif data.get("validation_data") is not None:
        counts["validation_batch_size"] = (kwargs.get("validation_batch_size") or batch_size,
                                           data_sources.sample_count(data["validation_data"], storage_options))
    for name, (size, samples) in counts.items():
        if size % num_workers:
            raise ConfigurationError(
                f"{name}={size} with the JAX backend on {num_workers} workers: each global batch is split "
                f"evenly across the workers. Pass a {name} divisible by {num_workers}.")
        uneven = jax_distribution.uneven_batch(samples, size, num_workers) if samples is not None else None
        if uneven is not None:
            raise ConfigurationError(
                f"{samples} samples in batches of {size} end with a batch of {uneven}, which does not split "
                f"evenly across {num_workers} JAX workers. Pick a {name} that divides {samples}, or drop "
                f"{uneven % num_workers} samples.")
