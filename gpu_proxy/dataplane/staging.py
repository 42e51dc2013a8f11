"""The data plane of a cluster given by address, through a staging fsspec URL (``staging_dir``).

Home uploads the payload to ``<staging_dir>/<run>/payload``; the run's supervisor downloads it
into its own folder, checking size and hash as it arrives, and uploads each large result beside
it; home downloads those the same way. Object stores make an object visible only once its upload
completed; on filesystems that do not, a partial file still fails the hash check and is never
used. Home removes ``<staging_dir>/<run>/`` once the results are home, whatever the run's end.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

from gpu_proxy.dataplane.base import PAYLOAD, RETENTION_DAYS, ClusterTransport, DataPlane, result_name
from gpu_proxy.dataplane.package import (CHUNK, Package, PackageError, StoredFile, read_file, write)


def _filesystem(url: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url, **(options or {}))


def upload(package: Package, url: str, options: dict[str, Any] | None) -> StoredFile:
    fs, path = _filesystem(url, options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores; needed on file://
    with fs.open(path, "wb", block_size=64 << 20) as file:
        size, sha256 = write(package, file)
    return StoredFile(url, size, sha256)


def download(stored: StoredFile, local_path: str, options: dict[str, Any] | None) -> None:
    """Copy ``stored`` into ``local_path``, hashing as it arrives; raise unless it is what was written."""
    fs, path = _filesystem(stored.location, options)
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb", block_size=64 << 20) as source, open(local_path, "wb") as target:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            target.write(chunk)
            size += len(chunk)
    if (size, digest.hexdigest()) != (stored.size, stored.sha256):
        raise PackageError(f"{stored.location} has {size} bytes (expected {stored.size}) or a different "
                           "SHA-256: an incomplete or foreign upload, not used")


def fetch_url(stored: StoredFile, options: dict[str, Any] | None) -> Package:
    descriptor, local = tempfile.mkstemp(prefix="gpu-proxy-result-")
    os.close(descriptor)
    try:
        download(stored, local, options)
        return read_file(local, stored, checked=True)
    finally:
        os.unlink(local)  # the mapping keeps it readable


class StagingTransport(ClusterTransport):
    def __init__(self, run_url: str, options: dict[str, Any] | None) -> None:
        super().__init__()
        self.run_url = run_url
        self.options = options  # credentials in it are gpu_proxy.secrets references in any pickle

    def receive(self, payload: StoredFile) -> StoredFile:
        local = os.path.join(self.open(), PAYLOAD)
        download(payload, local, self.options)
        return StoredFile(local, payload.size, payload.sha256)

    def deliver(self, result: StoredFile) -> dict[str, Any]:
        name = os.path.basename(result.location)
        with open(result.location, "rb") as file:
            import mmap

            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
                fs, path = _filesystem(f"{self.run_url}/{name}", self.options)
                with fs.open(path, "wb", block_size=64 << 20) as target:
                    for start in range(0, len(mapping), CHUNK):
                        target.write(mapping[start:start + CHUNK])
        return {"stored": StoredFile(f"{self.run_url}/{name}", result.size, result.sha256).to_dict()}


class StagingPlane(DataPlane):
    def __init__(self, run_name: str, staging_dir: str, options: dict[str, Any] | None) -> None:
        super().__init__(run_name)
        self.run_url = f"{staging_dir.rstrip('/')}/{run_name}"
        self.options = options

    def send(self, payload: Package) -> StoredFile:
        self._remove_expired()
        return upload(payload, f"{self.run_url}/{PAYLOAD}", self.options)

    def _remove_expired(self) -> None:
        """Folders of detached runs nobody attached to within the retention (best effort)."""
        import time

        fs, root = _filesystem(self.run_url.rsplit("/", 1)[0], self.options)
        try:
            entries = fs.ls(root, detail=True)
        except (FileNotFoundError, OSError):
            return
        cutoff = time.time() - RETENTION_DAYS * 86400
        for entry in entries:
            try:  # a run's first result is what waits for attach; its age is the folder's
                if fs.modified(f"{entry['name']}/{result_name(0)}").timestamp() < cutoff:
                    fs.rm(entry["name"], recursive=True)
            except (FileNotFoundError, OSError, NotImplementedError, ValueError):
                continue

    def transport(self) -> ClusterTransport:
        return StagingTransport(self.run_url, self.options)

    def fetch(self, result: StoredFile) -> Package:
        return fetch_url(result, self.options)

    def clean(self) -> None:
        fs, path = _filesystem(self.run_url, self.options)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
