"""The fallback data plane of a cluster given by address with no ``staging_dir``: the Jobs API.

The payload travels in chunks through the dashboard's package store (``PUT /api/packages/gcs/``,
token-checked; each request under the dashboard's 100 MiB body limit), which the run's
supervisor reads and deletes. Results travel inline in the job's log. Both sit in the cluster's
GCS memory or log for a while, so this path is capped at :data:`LIMIT` each way, and a run whose
payload is larger fails before it is submitted, naming ``staging_dir``.
"""
from __future__ import annotations

import os
from typing import Any

from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.dataplane.base import PAYLOAD, ClusterTransport, DataPlane
from gpu_proxy.dataplane.package import Package, PackageError, StoredFile, check_file, write
from gpu_proxy.errors import ConfigurationError

LIMIT = 256 << 20
CHUNK_BYTES = 64 << 20


def too_large(what: str, size: int) -> ConfigurationError:
    return ConfigurationError(
        f"{what} is {size / 2**20:.0f} MiB, more than the {LIMIT >> 20} MiB a cluster given only by its "
        "dashboard address can carry (through the Jobs API). Pass staging_dir='s3://bucket/path' (any fsspec "
        "URL both this machine and the cluster reach; a checkpoint_dir is used by default), or reach the "
        "cluster over SSH (gpu_proxy.SSHCluster / TunneledRayCluster), which has no limit.")


class _ChunkWriter:
    """A file-like sink that PUTs each full chunk to the cluster's package store as it fills."""

    def __init__(self, endpoint: Endpoint, run_name: str) -> None:
        self.endpoint, self.run_name = endpoint, run_name
        self.buffer = bytearray()
        self.count = 0

    def write(self, data: memoryview) -> None:
        self.buffer += data
        while len(self.buffer) >= CHUNK_BYTES:
            self._put(bytes(self.buffer[:CHUNK_BYTES]))
            del self.buffer[:CHUNK_BYTES]

    def close(self) -> None:
        if self.buffer or not self.count:
            self._put(bytes(self.buffer))
            self.buffer = bytearray()

    def _put(self, chunk: bytes) -> None:
        from gpu_proxy.runs import cluster_kv

        cluster_kv.put_value(self.endpoint, self.run_name, f"{PAYLOAD}{self.count}", chunk, timeout_s=300)
        self.count += 1


class KVTransport(ClusterTransport):
    def __init__(self, run_name: str, chunks: int) -> None:
        super().__init__()
        self.run_name, self.chunks = run_name, chunks

    def receive(self, payload: StoredFile) -> StoredFile:
        from gpu_proxy.runs import cluster_kv

        local = os.path.join(self.open(), PAYLOAD)
        with open(local, "wb") as file:
            for index in range(self.chunks):
                chunk = cluster_kv.take_value(self.run_name, f"{PAYLOAD}{index}")
                if chunk is None:
                    raise PackageError(f"chunk {index} of the run's payload is missing from the cluster's store")
                file.write(chunk)
        stored = StoredFile(local, payload.size, payload.sha256)
        check_file(local, stored)
        return stored

    def deliver(self, result: StoredFile) -> dict[str, Any]:
        if result.size > LIMIT:
            raise too_large("A result of this run", result.size)
        with open(result.location, "rb") as file:
            return {"value": file.read()}


class JobsAPIPlane(DataPlane):
    def __init__(self, run_name: str, endpoint: Endpoint) -> None:
        super().__init__(run_name)
        self.endpoint = endpoint
        self._chunks = 0

    def check(self, payload: Package, expected_result_bytes: int = 0) -> None:
        if payload.nbytes > LIMIT:
            raise too_large("The run's payload (the model, its data and the Trainer)", payload.nbytes)
        if expected_result_bytes > LIMIT:
            raise too_large("The run's results (the trained weights)", expected_result_bytes)

    def send(self, payload: Package) -> StoredFile:
        self.check(payload)
        writer = _ChunkWriter(self.endpoint, self.run_name)
        size, sha256 = write(payload, writer)
        writer.close()
        self._chunks = writer.count
        return StoredFile(f"gcs:{self.run_name}", size, sha256)

    def transport(self) -> ClusterTransport:
        return KVTransport(self.run_name, self._chunks)

    def fetch(self, result: StoredFile) -> Package:
        from gpu_proxy.dataplane.staging import fetch_url

        return fetch_url(result, None)  # only a result staged by URL (a detached run's) gets here

    def clean(self) -> None:
        """Chunks the supervisor never took (the job failed to start) are overwritten with nothing."""
        from gpu_proxy.runs import cluster_kv

        for index in range(self._chunks):
            try:
                cluster_kv.put_value(self.endpoint, self.run_name, f"{PAYLOAD}{index}", b"", timeout_s=10)
            except OSError:
                pass
