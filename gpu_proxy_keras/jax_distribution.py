"""Several JAX workers train as one: ``keras.distribution`` data parallelism across processes.

Each rank is one JAX process (run in a fresh process: ``jax.distributed`` starts once per
process); rank 0's rendezvous point (``master_addr:master_port``) is JAX's coordinator. On CPU the
processes' collectives go through gloo. ``DataParallel`` over every process's devices replicates
the variables and splits each global batch across the devices.

Keras' JAX trainer takes the batches a process is fed as that process's part of the global batch
(``jax.make_array_from_process_local_data``). So that ``batch_size`` means what it means locally,
each rank is fed, for every global batch of ``batch_size`` samples, its own contiguous
``batch_size / world_size`` of them, with ``batch_size / world_size`` as its batch size: the
numbers are those of one process with ``world_size`` devices on the same global batches (tested
to 1e-5). Every global batch, the last included, must split evenly across the workers; home checks
that before anything starts (``arguments.check_jax_fit``).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def setup(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Join the run's JAX processes and make data parallelism over all of them Keras' default."""
    import jax
    import keras

    # CPU devices' collectives (GPUs use NCCL whatever this says); asking which backend is in use
    # would start it, and jax.distributed must start first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(f"{master_addr}:{master_port}", world_size, rank)
    # The data is already split per process (local_batches), so Keras must not shard it again.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices(), auto_shard_dataset=False))


def local_batches(value: Any, batch_size: int, rank: int, world_size: int) -> Any:
    """This rank's part of every global batch of ``value`` (arrays, or dicts/lists/tuples of them)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: local_batches(item, batch_size, rank, world_size) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local_batches(item, batch_size, rank, world_size) for item in value)
    return value[rows_of_rank(len(value), batch_size, rank, world_size)]


def rows_of_rank(count: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Indices of this rank's rows: its ``1/world_size`` of each global batch, in order."""
    parts = []
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start) // world_size
        parts.append(np.arange(start + rank * size, start + (rank + 1) * size))
    return np.concatenate(parts) if parts else np.arange(0)


def uneven_batch(count: int, batch_size: int, world_size: int) -> int | None:
    """The size of a global batch of ``count`` samples that does not split evenly, or None."""
    sizes = ([batch_size] if count >= batch_size else []) + ([count % batch_size] if count % batch_size else [])
    return next((size for size in sizes if size % world_size), None)


def local_fit_arguments(data: dict[str, Any], kwargs: dict[str, Any], rank: int,
                        world_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``fit``'s data and arguments for one rank: its part of every global batch, per-rank batch sizes.

    ``validation_split`` is done here first, as Keras does it (the last fraction of the samples), since
    after the split per rank Keras would take each rank's last fraction instead."""
    data, kwargs = dict(data), dict(kwargs)
    batch_size = kwargs.get("batch_size") or 32
    validation_batch_size = kwargs.get("validation_batch_size") or batch_size
    if kwargs.get("validation_split"):
        count = len(_first_leaf(data["x"]))
        split_at = int(np.floor(count * (1.0 - kwargs["validation_split"])))
        train = {name: _rows(data.get(name), slice(0, split_at)) for name in ("x", "y", "sample_weight")}
        x_val, y_val, weights_val = (_rows(data.get(name), slice(split_at, None)) for name in ("x", "y", "sample_weight"))
        data.update(train)
        # Keras reads a 2-tuple as (x, y): held-out weights always go third.
        data["validation_data"] = (x_val, y_val) if weights_val is None else (x_val, y_val, weights_val)
        kwargs["validation_split"] = 0.0
    for name in ("x", "y", "sample_weight"):
        data[name] = local_batches(data.get(name), batch_size, rank, world_size)
    if data.get("validation_data") is not None:
        data["validation_data"] = local_batches(data["validation_data"], validation_batch_size, rank, world_size)
    kwargs["batch_size"] = batch_size // world_size
    kwargs["validation_batch_size"] = validation_batch_size // world_size
    return {name: value for name, value in data.items() if value is not None}, kwargs


def _rows(value: Any, rows: slice) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: _rows(item, rows) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(item, rows) for item in value)
    return value[rows]


def _first_leaf(value: Any) -> Any:
    if isinstance(value, dict):
        return _first_leaf(next(iter(value.values())))
    if isinstance(value, (list, tuple)):
        return _first_leaf(value[0])
    return value
