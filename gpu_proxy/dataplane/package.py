"""A pickled object with its large buffers kept apart: how bulky run data is held and moved.

``pack(obj)`` pickles with protocol 5 and takes every out-of-band buffer (numpy arrays natively,
tensors through the reducers frameworks register in :mod:`gpu_proxy.shipping`) out of the pickle
stream, so packing a 1 GB model copies nothing: the package refers to the model's own memory.

On disk a package is one file, laid out so that a reader can map it and use the buffers in place:

    magic (8 bytes) | header length (u64) | header (JSON: head size, buffer sizes) | padding
    | pickle head | padding | buffer 0 | padding | buffer 1 | ...     (each part 64-byte aligned)

Invariants the code keeps:

1. A file is written as ``<name>.part`` and renamed to ``<name>`` only after its last byte, so a
   file under its final name is whole; a ``.part`` is never read.
2. Its size and SHA-256 are computed while it is written and travel beside it (a
   :class:`StoredFile`), never inside it; a reader checks both before it unpickles a byte.
3. A reader maps the file copy-on-write (``mmap.ACCESS_COPY``): buffers become writable arrays
   and tensors without a copy, and a write never reaches the file.

Buffers are held as flat ``uint8`` numpy arrays, never as long-lived ``memoryview`` slices: an
array keeps what it views (a mapping, an object-store buffer) alive through its ``base`` however
its consumers (numpy, torch, TensorFlow, JAX) share or drop it.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import pickle
import struct
import threading
from dataclasses import asdict, dataclass
from typing import IO, Any, Iterable

import numpy as np

MAGIC = b"GPXPKG1\n"
ALIGN = 64
CHUNK = 8 << 20  # bytes per write: large enough for speed, small enough to hash as we go


class PackageError(Exception):
    """A stored package is incomplete or damaged: it is never used."""


@dataclass(frozen=True)
class StoredFile:
    """Where a package's file lies and what it must be; small, picklable, JSON-able."""

    location: str  # a path on the machine that reads it, or an fsspec URL
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StoredFile":
        return cls(str(data["location"]), int(data["size"]), str(data["sha256"]))


class Package:
    """A pickle stream (``head``) and the buffers it refers to."""

    def __init__(self, head: bytes, buffers: list[np.ndarray]) -> None:
        self.head = head
        self.buffers = buffers

    @property
    def nbytes(self) -> int:
        return len(self.head) + sum(b.nbytes for b in self.buffers)

    def loads(self) -> Any:
        return pickle.loads(self.head, buffers=self.buffers)

    def __reduce_ex__(self, protocol: int):
        # Inside another pickle (Ray's, a nested package) the buffers stay out of band where possible.
        if protocol >= 5:
            return Package._rebuild, (self.head, [pickle.PickleBuffer(b) for b in self.buffers])
        return Package._rebuild, (self.head, [bytes(b) for b in self.buffers])

    @staticmethod
    def _rebuild(head: bytes, buffers: list[Any]) -> "Package":
        return Package(head, [as_bytes_array(b) for b in buffers])

    # ----- one file's bytes ------------------------------------------------------------------------
    def layout(self) -> tuple[bytes, list[memoryview]]:
        """The file's header bytes and the parts that follow it (with their padding)."""
        sizes = [b.nbytes for b in self.buffers]
        meta = json.dumps({"head": len(self.head), "buffers": sizes}).encode()
        header = MAGIC + struct.pack("<Q", len(meta)) + meta
        header += b"\0" * (_padded(len(header)) - len(header))
        parts: list[memoryview] = []
        for part in [memoryview(self.head), *(memoryview(b) for b in self.buffers)]:
            parts.append(part)
            pad = _padded(part.nbytes) - part.nbytes
            if pad:
                parts.append(memoryview(b"\0" * pad))
        return header, parts

    def to_bytes(self) -> bytes:
        header, parts = self.layout()
        return b"".join([header, *parts])

    @classmethod
    def from_bytes(cls, data: Any) -> "Package":
        """The package in ``data`` (bytes, or a mapping), its buffers viewing ``data`` without a copy."""
        view = as_bytes_array(data)
        if bytes(view[:len(MAGIC)]) != MAGIC:
            raise PackageError("not a gpu-proxy package (bad magic)")
        (meta_len,) = struct.unpack("<Q", view[len(MAGIC):len(MAGIC) + 8])
        meta = json.loads(bytes(view[len(MAGIC) + 8:len(MAGIC) + 8 + meta_len]))
        offset = _padded(len(MAGIC) + 8 + meta_len)
        parts = []
        for size in [meta["head"], *meta["buffers"]]:
            if offset + size > len(view):
                raise PackageError("the package is shorter than its header says")
            parts.append(view[offset:offset + size])
            offset += _padded(size)
        return cls(bytes(parts[0]), parts[1:])


def as_bytes_array(buffer: Any) -> np.ndarray:
    """``buffer`` (bytes, an array, a mapping, a PickleBuffer) as a flat uint8 array viewing it."""
    if isinstance(buffer, np.ndarray) and buffer.dtype == np.uint8 and buffer.ndim == 1:
        return buffer
    return np.frombuffer(buffer, dtype=np.uint8)


def _padded(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def write(package: Package, file: IO[bytes]) -> tuple[int, str]:
    """Write ``package`` to an open binary file; return its size and SHA-256 (invariant 2).

    The hash is taken on a thread of its own while the bytes are written: both release the GIL,
    and hashing (~2 GB/s) would otherwise add as much again to a write into memory or a pipe.
    Both read the package's own buffers, which nothing changes meanwhile."""
    header, parts = package.layout()
    chunks = list(_chunks([memoryview(header), *parts]))  # views: no copy
    digest = hashlib.sha256()
    hasher = threading.Thread(target=_hash_into, args=(digest, chunks), name="gpu-proxy-hash", daemon=True)
    hasher.start()
    size = 0
    try:
        for chunk in chunks:
            file.write(chunk)
            size += chunk.nbytes
    finally:
        hasher.join()
    return size, digest.hexdigest()


def _hash_into(digest: Any, chunks: list[memoryview]) -> None:
    for chunk in chunks:
        digest.update(chunk)


def _chunks(parts: Iterable[memoryview]) -> Iterable[memoryview]:
    for part in parts:
        for start in range(0, part.nbytes, CHUNK):
            yield part[start:start + CHUNK]


def write_file(package: Package, path: str) -> StoredFile:
    """Write ``package`` to ``path`` through ``path.part`` (invariant 1)."""
    part = path + ".part"
    try:
        with open(part, "wb") as file:
            size, sha256 = write(package, file)
        os.replace(part, path)
    except BaseException:
        _remove(part)
        raise
    return StoredFile(path, size, sha256)


def check_file(path: str, expected: StoredFile, size_only: bool = False) -> None:
    """Raise :class:`PackageError` unless the file at ``path`` has the expected size and hash.

    ``size_only`` for a file whose hash was already checked as it was written on this machine."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise PackageError(f"{expected.location}: {exc.strerror or exc}") from None
    if size != expected.size:
        raise PackageError(f"{expected.location} has {size} bytes where {expected.size} were written: "
                           "the transfer was cut short")
    if size_only:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    check_digest(expected, size, digest.hexdigest())


def check_digest(expected: StoredFile, size: int, sha256: str) -> None:
    """Raise :class:`PackageError` unless ``size`` and ``sha256`` (of bytes as they arrived) are ``expected``'s."""
    if size != expected.size:
        raise PackageError(f"{expected.location} has {size} bytes where {expected.size} were written: "
                           "the transfer was cut short")
    if sha256 != expected.sha256:
        raise PackageError(f"{expected.location} does not have the content that was written (SHA-256 differs)")


def read_file(path: str, expected: StoredFile, checked: bool = False, size_only: bool = False) -> Package:
    """Map the file at ``path`` (invariant 3) once its size and hash match ``expected``.

    ``checked``: the caller checked it already; ``size_only``: it was written on this machine,
    where invariant 1 alone keeps a partial file from its final name."""
    if not checked:
        check_file(path, expected, size_only=size_only)
    if expected.size == 0:
        raise PackageError(f"{expected.location} is empty")
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    return Package.from_bytes(mapping)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
