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
   and tensors without a copy, and a write never reaches the file. The one exception is
   :func:`read_file_in_place`, for a reader that is the file's only one (a run's lone worker): its
   writes go into the file's own pages, which saves a copy-on-write fault per page it writes
   (2 GB of weights: ~0.7 s in place, 1-7 s copied on write on a VM).
4. A result file carries no hash where it is written (``sha256`` None) when its plane's fetch
   reads it where it lies (the embedded cluster) or hashes it as it streams it home (the SSH
   head's sender, which checks its size first): invariant 1 already keeps a partial file from
   its final name, and the bytes that cross a link are hashed at both ends of it. The same holds
   for a payload home writes for a reader on its own machine. Whatever crosses a network or a
   store is hashed.
5. A result file may leave some buffers in the run's payload file, as spans of it (``spans``
   in its header, ``spans_of`` in its :class:`StoredFile`): those its in-place reader wrote its
   result into (invariant 3's exception), which need no second copy. Such a file is read where
   both files lie, or streamed home with its spans after it; the payload stays until the result
   is home.

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
from typing import IO, Any, Callable, Iterable

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
    sha256: str | None  # None: read only on the machine that wrote it (invariant 4)
    spans_of: str | None = None  # the file in the same folder some of its buffers lie in (invariant 5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StoredFile":
        sha256, spans_of = data.get("sha256"), data.get("spans_of")
        return cls(str(data["location"]), int(data["size"]), None if sha256 is None else str(sha256),
                   None if spans_of is None else str(spans_of))


@dataclass(frozen=True)
class MappedInPlace:
    """A package file this process mapped for writing (:func:`read_file_in_place`): where it lies
    in memory, so that buffers still there can be written as spans of it (invariant 5)."""

    name: str  # its file name, in the folder a result is written to
    size: int
    address: int

    def offset_of(self, buffer: np.ndarray) -> int | None:
        start = buffer.__array_interface__["data"][0]
        inside = self.address <= start and start + buffer.nbytes <= self.address + self.size
        return start - self.address if inside and buffer.nbytes else None


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
    def has_spans_in(self, mapped: MappedInPlace) -> bool:
        return any(mapped.offset_of(b) is not None for b in self.buffers)

    def layout(self, spans_of: MappedInPlace | None = None) -> tuple[bytes, list[memoryview]]:
        """The file's header bytes and the parts that follow it (with their padding); buffers that
        lie in ``spans_of`` are written as spans of it instead (invariant 5)."""
        sizes = [b.nbytes for b in self.buffers]
        fields: dict[str, Any] = {"head": len(self.head), "buffers": sizes}
        offsets = [spans_of.offset_of(b) for b in self.buffers] if spans_of is not None else []
        if any(offset is not None for offset in offsets):
            fields["spans"] = {"file": spans_of.name, "size": spans_of.size, "offsets": offsets}
        meta = json.dumps(fields).encode()
        header = MAGIC + struct.pack("<Q", len(meta)) + meta
        header += b"\0" * (padded(len(header)) - len(header))
        written = [b for i, b in enumerate(self.buffers) if not offsets or offsets[i] is None]
        parts: list[memoryview] = []
        for part in [memoryview(self.head), *(memoryview(b) for b in written)]:
            parts.append(part)
            pad = padded(part.nbytes) - part.nbytes
            if pad:
                parts.append(memoryview(b"\0" * pad))
        return header, parts

    def file_size(self) -> int:
        """How many bytes :func:`write` writes for this package."""
        header, parts = self.layout()
        return len(header) + sum(part.nbytes for part in parts)

    def to_bytes(self) -> bytes:
        header, parts = self.layout()
        return b"".join([header, *parts])

    @classmethod
    def from_bytes(cls, data: Any, span_file: Callable[[str, int], np.ndarray] | None = None) -> "Package":
        """The package in ``data`` (bytes, or a mapping), its buffers viewing ``data`` without a copy.

        ``span_file(name, size)``: the mapped file a result's spans lie in (invariant 5), or anything
        that slices like one (:mod:`gpu_proxy.dataplane.ssh` streams the spans after the file)."""
        view = as_bytes_array(data)
        meta, offset = header_of(view)
        spans = meta.get("spans")
        if spans is not None and span_file is None:
            raise PackageError(f"the package refers to {spans['file']}, which is not here to read")
        sibling = span_file(spans["file"], spans["size"]) if spans is not None else None
        offsets = spans["offsets"] if spans is not None else [None] * len(meta["buffers"])
        if offset + meta["head"] > len(view):
            raise PackageError("the package is shorter than its header says")
        head = bytes(view[offset:offset + meta["head"]])
        offset += padded(meta["head"])
        buffers = []
        for size, span in zip(meta["buffers"], offsets):
            source, start = (view, offset) if span is None else (sibling, span)
            if start + size > len(source):
                raise PackageError("the package is shorter than its header says")
            buffers.append(source[start:start + size])
            if span is None:
                offset += padded(size)
        return cls(head, buffers)


def header_of(view: np.ndarray) -> tuple[dict[str, Any], int]:
    """A package file's header fields, and where its pickle head starts."""
    if bytes(view[:len(MAGIC)]) != MAGIC:
        raise PackageError("not a gpu-proxy package (bad magic)")
    (meta_len,) = struct.unpack("<Q", view[len(MAGIC):len(MAGIC) + 8])
    return json.loads(bytes(view[len(MAGIC) + 8:len(MAGIC) + 8 + meta_len])), padded(len(MAGIC) + 8 + meta_len)


def as_bytes_array(buffer: Any) -> np.ndarray:
    """``buffer`` (bytes, an array, a mapping, a PickleBuffer) as a flat uint8 array viewing it."""
    if isinstance(buffer, np.ndarray) and buffer.dtype == np.uint8 and buffer.ndim == 1:
        return buffer
    return np.frombuffer(buffer, dtype=np.uint8)


def padded(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def write(package: Package, file: IO[bytes], spans_of: MappedInPlace | None = None) -> tuple[int, str]:
    """Write ``package`` to an open binary file; return its size and SHA-256 (invariant 2).

    The hash is taken on a thread of its own while the bytes are written: both release the GIL,
    and hashing (~2 GB/s) would otherwise add as much again to a write into memory or a pipe.
    Both read the package's own buffers, which nothing changes meanwhile."""
    header, parts = package.layout(spans_of)
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


def write_file(package: Package, path: str, hashed: bool = True,
               spans_of: MappedInPlace | None = None) -> StoredFile:
    """Write ``package`` to ``path`` through ``path.part`` (invariant 1); ``hashed=False`` for a
    file read only on this machine (invariant 4), which may then leave buffers in ``spans_of``
    (invariant 5)."""
    part = path + ".part"
    try:
        with open(part, "wb") as file:
            if hashed:
                size, sha256 = write(package, file)
            else:
                header, parts = package.layout(spans_of)
                size, sha256 = len(header), None
                file.write(header)
                for chunk in _chunks(parts):
                    size += file.write(chunk)
        os.replace(part, path)
    except BaseException:
        _remove(part)
        raise
    spanned = not hashed and spans_of is not None and package.has_spans_in(spans_of)
    return StoredFile(path, size, sha256, spans_of.name if spanned else None)


def check_file(path: str, expected: StoredFile, size_only: bool = False) -> None:
    """Raise :class:`PackageError` unless the file at ``path`` has the expected size and hash.

    ``size_only`` for a file whose hash was already checked as it was written on this machine; a
    file with no hash has its size checked alone (invariant 4)."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise PackageError(f"{expected.location}: {exc.strerror or exc}") from None
    if size != expected.size:
        raise PackageError(f"{expected.location} has {size} bytes where {expected.size} were written: "
                           "the transfer was cut short")
    if size_only or expected.sha256 is None:
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
    """Map the file at ``path`` (invariant 3) once its size and hash match ``expected``, and the
    payload file beside it if some of its buffers are spans of that (invariant 5).

    ``checked``: the caller checked it already; ``size_only``: see :func:`check_file`."""
    if not checked:
        check_file(path, expected, size_only=size_only)
    if expected.size == 0:
        raise PackageError(f"{expected.location} is empty")
    folder = os.path.dirname(path)

    def span_file(name: str, size: int) -> np.ndarray:
        sibling = os.path.join(folder, os.path.basename(name))
        if expected.spans_of != name:
            raise PackageError(f"{expected.location} refers to {name}, which its record does not name")
        check_file(sibling, StoredFile(sibling, size, None))
        return as_bytes_array(_map(sibling, mmap.ACCESS_COPY))

    return Package.from_bytes(_map(path, mmap.ACCESS_COPY), span_file)


def read_file_in_place(path: str, expected: StoredFile) -> tuple[Package, MappedInPlace]:
    """Map a checked file for writing, by its only reader (invariant 3's exception): what the
    reader writes into its buffers goes into the file, and :class:`MappedInPlace` says where."""
    mapping = _map(path, mmap.ACCESS_WRITE)
    view = as_bytes_array(mapping)
    where = MappedInPlace(os.path.basename(path), len(view), view.__array_interface__["data"][0])
    return Package.from_bytes(view), where


def _map(path: str, access: int) -> mmap.mmap:
    with open(path, "r+b" if access == mmap.ACCESS_WRITE else "rb") as file:
        return mmap.mmap(file.fileno(), 0, access=access)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
