"""Data arguments as a worker feeds them to Keras, and each rank's shard of them.

A data argument (``x``, ``y``, ``validation_data``, ``sample_weight``) is one of:

- numpy arrays, or dicts/lists/tuples of them: they travel inside the run's payload, which the
  cluster puts in Ray's object store once for all workers;
- a string: an fsspec URL or path to a ``.npy`` file (an array) or a ``.npz`` file (a dict of arrays,
  e.g. a multi-input model's named inputs), read by the workers themselves. A rank that needs only
  its shard of a ``.npy`` reads only those rows (a ranged read: it never downloads the rest);
- a function that builds the data (a ``tf.data.Dataset``, a ``keras.utils.PyDataset``, arrays),
  called on each worker.

Sharding (``evaluate``/``predict`` on several workers) splits samples into contiguous, near-equal
ranges in rank order, so concatenating the ranks' predictions gives the input order back. A dataset
built by a function is sharded by batches: ``Dataset.shard`` or every ``world_size``-th PyDataset
batch.

Imports Keras: import this module on a worker only once the backend is chosen.
"""
from __future__ import annotations

import math
import os
from typing import Any
from urllib.parse import urlsplit

import keras
import numpy as np

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.storage.location import resolve
from gpu_proxy.storage.redact import redact

FILE_SUFFIXES = (".npy", ".npz")

Shard = tuple[int, int]  # (rank, world_size)


# ----- at home ---------------------------------------------------------------------------------
def check_file(name: str, url: str, storage_options: dict[str, Any] | None) -> None:
    """Refuse a data URL the workers could not read, before anything starts."""
    shown = redact(url, storage_options)
    if _suffix(url) not in FILE_SUFFIXES:
        raise ConfigurationError(
            f"{name}={shown!r}: a string in a data argument is read as a file URL, and it must name a .npy "
            "file (an array) or a .npz file (a dict of arrays); string labels go in a numpy array. For other formats pass a function that builds a tf.data.Dataset or a "
            f"keras.utils.PyDataset from it, e.g. {name}=lambda: make_dataset(url); every worker calls it.")
    fs, path = resolve(url, storage_options)
    if not fs.exists(path):
        raise ConfigurationError(
            f"{name}={shown!r} does not exist (checked from here with RemoteFit's storage_options). "
            "Fix the URL, or upload the file first; the workers read it from the same URL.")


def sample_count(value: Any, storage_options: dict[str, Any] | None) -> int | None:
    """How many samples a data argument holds; None when only the workers can tell (a function)."""
    if isinstance(value, str):
        fs, path = resolve(value, storage_options)
        with fs.open(path, "rb") as file:
            if _suffix(value) == ".npy":
                shape = _npy_header(file)[0]
            else:  # only the first member's header, never its (maybe compressed) data
                with np.load(file) as arrays, arrays.zip.open(arrays.files[0] + ".npy") as member:
                    shape = _npy_header(member)[0]
        if not shape:
            raise ConfigurationError(f"{redact(value, storage_options)!r} holds a 0-d array; data needs a "
                                     "sample axis (shape (samples, ...)).")
        return shape[0]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        counts = (sample_count(item, storage_options) for item in value)
        return next((count for count in counts if count is not None), None)
    if hasattr(value, "__len__") and not callable(value):
        return len(value)
    return None


def concatenate(parts: list[Any]) -> Any:
    """The ranks' predictions (arrays, or dicts/lists/tuples of them), joined in rank order."""
    first = parts[0]
    if isinstance(first, dict):
        return {key: concatenate([part[key] for part in parts]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concatenate([part[i] for part in parts]) for i in range(len(first)))
    return np.concatenate([np.asarray(part) for part in parts], axis=0)


# ----- on a worker -----------------------------------------------------------------------------
def materialise(value: Any, storage_options: dict[str, Any] | None, shard: Shard | None = None) -> Any:
    """The data argument as Keras takes it, only this rank's shard when ``shard`` is given."""
    if isinstance(value, str):
        return _read_file(value, storage_options, shard)
    if isinstance(value, dict):
        return {key: materialise(item, storage_options, shard) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(materialise(item, storage_options, shard) for item in value)
    if isinstance(value, keras.utils.PyDataset):
        return _shard_built(value, shard) if shard is not None else value
    if callable(value) and not hasattr(value, "__getitem__") and not hasattr(value, "__array__"):
        built = value()
        return _shard_built(built, shard) if shard is not None else built
    return _shard_rows(value, shard) if shard is not None else value


def _suffix(url: str) -> str:
    """The file suffix of a URL's path (a signed URL's query string does not count)."""
    path = urlsplit(url).path if "://" in url else url
    return os.path.splitext(path)[1].lower()


def bounds(count: int, shard: Shard) -> tuple[int, int]:
    rank, world_size = shard
    return count * rank // world_size, count * (rank + 1) // world_size


def _shard_rows(value: Any, shard: Shard) -> Any:
    if isinstance(value, dict):
        return {key: _shard_rows(item, shard) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_shard_rows(item, shard) for item in value)
    if value is None:
        return None
    start, end = bounds(len(value), shard)
    return value[start:end]


def _shard_built(built: Any, shard: Shard) -> Any:
    rank, world_size = shard
    if isinstance(built, keras.utils.PyDataset):
        _check_batches(len(built), world_size)
        return PyDatasetShard(built, rank, world_size)
    if type(built).__module__.startswith("tensorflow") and hasattr(built, "shard"):
        _check_batches(int(built.cardinality()), world_size)  # negative: unknown or infinite
        return built.shard(world_size, rank)
    return _shard_rows(built, shard)


def _check_batches(batches: int, world_size: int) -> None:
    if 0 <= batches < world_size:
        raise ValueError(f"the dataset has {batches} batches, fewer than the {world_size} workers sharing "
                         f"it by batches: use RemoteFit(num_workers={max(batches, 1)}) for it.")


def _read_file(url: str, storage_options: dict[str, Any] | None, shard: Shard | None) -> Any:
    fs, path = resolve(url, storage_options)
    with fs.open(path, "rb") as file:
        if _suffix(url) == ".npy":
            return _read_npy_rows(file, shard)
        # A .npz member is a (possibly compressed) zip entry: it is read whole, then sliced.
        with np.load(file) as arrays:
            loaded = {key: arrays[key] for key in arrays.files}
    return _shard_rows(loaded, shard) if shard is not None else loaded


def _npy_header(file: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(file)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"unsupported .npy format version {version}")
    return read_header(file)


def _read_npy_rows(file: Any, shard: Shard | None) -> np.ndarray:
    shape, fortran_order, dtype = _npy_header(file)
    if dtype.hasobject:
        raise ValueError("the .npy file holds Python objects; only plain numeric arrays are read")
    rows = shape[0] if shape else 1
    start, end = bounds(rows, shard) if shard is not None else (0, rows)
    if fortran_order and shard is not None:  # rows are not contiguous on disk: read it all
        data = _read_exact(file, math.prod(shape) * dtype.itemsize)
        return np.frombuffer(data, dtype).reshape(shape[::-1]).T[start:end].copy()
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    file.seek(start * row_bytes, 1)
    data = _read_exact(file, (end - start) * row_bytes)
    array = np.frombuffer(data, dtype)
    if fortran_order:
        return array.reshape(shape[::-1]).T.copy()
    return array.reshape((end - start,) + tuple(shape[1:])) if shape else array.reshape(())


def _read_exact(file: Any, size: int) -> bytearray:
    data = bytearray(file.read(size))
    if len(data) != size:
        raise ValueError(f"the .npy file ended early: {len(data)} of {size} bytes")
    return data  # writable, so Keras may use the array in place


class PyDatasetShard(keras.utils.PyDataset):
    """This rank's contiguous range of a ``keras.utils.PyDataset``'s batches."""

    def __init__(self, dataset: keras.utils.PyDataset, rank: int, world_size: int) -> None:
        super().__init__(workers=dataset.workers, use_multiprocessing=dataset.use_multiprocessing,
                         max_queue_size=dataset.max_queue_size)
        self._dataset = dataset
        # Contiguous, as for arrays: predict joins the ranks' outputs in rank order.
        self._batches = range(*bounds(len(dataset), (rank, world_size)))

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index: int) -> Any:
        return self._dataset[self._batches[index]]

    def on_epoch_end(self) -> None:
        self._dataset.on_epoch_end()
