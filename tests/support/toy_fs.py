"""Small fsspec filesystems for storage tests, registered under test protocols on import.

- `toyfs://`: a dict-backed `AbstractFileSystem` subclass, written from scratch, that gives the
  weakest guarantees a backend can give: a file being written is visible and grows as bytes
  arrive, and `mv` is copy + delete. It stands for "a custom filesystem we know nothing about".
  Tests can hold its writes at a gate (to see what a caller does while an upload is in flight)
  or make them fail after some bytes (a crash mid-upload).
- `slowfile://`: the local filesystem with uploads copied in small, slow chunks, so that a test
  can SIGKILL a process in the middle of one.

    from tests.support.toy_fs import ToyFileSystem, toyfs  # noqa: F401
"""
from __future__ import annotations

import io
import os
import threading
import time

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem


class ToyFileSystem(AbstractFileSystem):
    protocol = "toyfs"
    root_marker = ""

    # Shared by all instances: Lightning and the code under test resolve URLs separately.
    store: dict[str, bytearray] = {}
    write_gate: threading.Event | None = None  # payload writes wait for it when set
    fail_after_bytes: int | None = None  # payload writes raise once this many bytes were written
    writes_started = threading.Event()  # set when a gated/failing payload write begins

    @classmethod
    def reset(cls) -> None:
        cls.store = {}
        cls.write_gate = None
        cls.fail_after_bytes = None
        cls.writes_started = threading.Event()

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("toyfs://"):] if path.startswith("toyfs://") else path
        return path.strip("/")

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        path = self._strip_protocol(path)
        if "r" in mode:
            if path not in self.store:
                raise FileNotFoundError(path)
            return io.BytesIO(bytes(self.store[path]))
        return _ToyWriter(self, path)

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        prefix = f"{path}/" if path else ""
        entries: dict[str, dict] = {}
        for key, data in list(self.store.items()):
            if not key.startswith(prefix):
                continue
            child, _, rest = key[len(prefix):].partition("/")
            name = prefix + child
            entries[name] = ({"name": name, "size": 0, "type": "directory"} if rest
                             else {"name": name, "size": len(data), "type": "file"})
        if not entries and path not in self.store:
            raise FileNotFoundError(path)
        if path in self.store and not entries:
            entries = {path: {"name": path, "size": len(self.store[path]), "type": "file"}}
        listing = sorted(entries.values(), key=lambda e: e["name"])
        return listing if detail else [e["name"] for e in listing]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path in self.store:
            return {"name": path, "size": len(self.store[path]), "type": "file"}
        if any(key.startswith(f"{path}/") for key in list(self.store)):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def cp_file(self, path1, path2, **kwargs):
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        if path1 not in self.store:
            raise FileNotFoundError(path1)
        self.store[path2] = bytearray(self.store[path1])

    def _rm(self, path):
        path = self._strip_protocol(path)
        if path not in self.store:
            raise FileNotFoundError(path)
        del self.store[path]

    def rm(self, path, recursive=False, maxdepth=None):
        for p in ([path] if isinstance(path, str) else path):
            p = self._strip_protocol(p)
            if p in self.store:
                del self.store[p]
            elif recursive:
                for key in [k for k in self.store if k.startswith(f"{p}/")]:
                    del self.store[key]
            else:
                raise FileNotFoundError(p)

    def makedirs(self, path, exist_ok=False):
        pass  # directories exist implicitly, as on an object store

    def mkdir(self, path, create_parents=True, **kwargs):
        pass


def _is_small_metadata(path: str) -> bool:
    # Markers and probes are not what the gate and the failure injection are about.
    return path.endswith(".json") or ".gpu-proxy-write-probe-" in path


class _ToyWriter(io.RawIOBase):
    """Makes the file visible at once and appends as bytes arrive: no atomicity at all."""

    def __init__(self, fs: ToyFileSystem, path: str) -> None:
        self.fs, self.path, self.written = fs, path, 0
        fs.store[path] = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if not _is_small_metadata(self.path):
            cls = type(self.fs)
            if cls.write_gate is not None or cls.fail_after_bytes is not None:
                cls.writes_started.set()
            if cls.write_gate is not None:
                cls.write_gate.wait()
            if cls.fail_after_bytes is not None and self.written + len(data) > cls.fail_after_bytes:
                keep = cls.fail_after_bytes - self.written
                self.fs.store[self.path] += data[:keep]
                raise OSError(f"toyfs: simulated failure after {cls.fail_after_bytes} bytes of {self.path}")
        self.fs.store[self.path] += data
        self.written += len(data)
        return len(data)


class SlowLocalFileSystem(LocalFileSystem):
    """Local files, with uploads (`put_file`) copied 1 MiB at a time at SLOWFILE_MBPS MiB/s."""

    protocol = ("slowfile",)
    chunk = 2**20

    def put_file(self, path1, path2, callback=None, **kwargs):
        delay = self.chunk / (float(os.environ.get("SLOWFILE_MBPS", "20")) * 2**20)
        path2 = self._strip_protocol(path2)
        self.makedirs(self._parent(path2), exist_ok=True)
        with open(path1, "rb") as src, open(path2, "wb") as dst:
            while block := src.read(self.chunk):
                dst.write(block)
                dst.flush()
                time.sleep(delay)


fsspec.register_implementation("toyfs", ToyFileSystem, clobber=True)
fsspec.register_implementation("slowfile", SlowLocalFileSystem, clobber=True)


@pytest.fixture
def toyfs():
    """A clean `toyfs://` store; yields the class, whose attributes control the fault injection."""
    ToyFileSystem.reset()
    yield ToyFileSystem
    if ToyFileSystem.write_gate is not None:
        ToyFileSystem.write_gate.set()  # never leave an uploader thread blocked
    ToyFileSystem.reset()
