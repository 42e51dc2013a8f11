"""Torch tensors pickled out of band: a model's weights travel as raw buffers, never copied to pack.

torch's own pickling copies every storage into a ``bytes`` object (``torch.save`` into a
``BytesIO``), so a 1 GB model costs 2 GB more while it is pickled and again while it is
unpickled. Here a plain CPU tensor reduces to its storage's memory as a ``PickleBuffer`` (see
:func:`gpu_proxy.shipping.pack`), and a reader builds the tensor on that memory in place: on a
mapped package file that is the file's pages, copy-on-write.

Tensors that share a storage (tied weights, views) still share it after the trip: the storage
is pickled once, through the pickler's memo, and each tensor refers to it with its own offset,
size and stride. Anything unusual (tensor subclasses, Python attributes on a tensor, sparse,
quantized or non-CPU tensors) is left to torch's own pickling. A non-leaf tensor arrives as a leaf,
as with torch's pickling.
"""
from __future__ import annotations

import pickle
from typing import Any

import torch

from gpu_proxy import shipping
from gpu_proxy.dataplane.package import as_bytes_array


class _Storage:
    """One storage's bytes; the same object for every tensor on that storage within one pack."""

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.storage = storage

    def __reduce_ex__(self, protocol: int):
        nbytes = self.storage.nbytes()
        if nbytes == 0:
            return _rebuild_storage, (b"",)
        flat = torch.empty(0, dtype=torch.uint8).set_(self.storage).numpy()
        return _rebuild_storage, (pickle.PickleBuffer(flat) if protocol >= 5 else flat.tobytes(),)


def _rebuild_storage(data: Any) -> torch.UntypedStorage:
    flat = as_bytes_array(data)
    if flat.nbytes == 0:
        return torch.UntypedStorage(0)
    if not flat.flags.writeable:  # e.g. Ray's object store: tensors must be writable, so this one copies
        flat = flat.copy()
    return torch.from_numpy(flat).untyped_storage()  # holds ``flat`` (and what it views) while it lives


def _rebuild_tensor(storage: torch.UntypedStorage, offset: int, size: tuple, stride: tuple,
                    dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    tensor = torch.empty(0, dtype=dtype).set_(storage, offset, size, stride)
    tensor.requires_grad_(requires_grad)
    return tensor


def _reduce_tensor(tensor: torch.Tensor, memo: dict) -> Any:
    if (tensor.device.type != "cpu" or tensor.layout != torch.strided or tensor.is_quantized
            or getattr(tensor, "__dict__", None)
            or tensor.is_conj() or tensor.is_neg()):
        return NotImplemented
    storage = tensor.untyped_storage()
    key = (storage.data_ptr(), storage.nbytes())
    if key not in memo:
        memo[key] = _Storage(storage)
    return _rebuild_tensor, (memo[key], tensor.storage_offset(), tuple(tensor.size()), tuple(tensor.stride()),
                             tensor.dtype, tensor.requires_grad)


shipping.register_out_of_band(torch.Tensor, _reduce_tensor)
