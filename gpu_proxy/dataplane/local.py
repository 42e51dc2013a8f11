"""The embedded cluster's data plane: a private folder on this machine, shared by home and workers.

Home writes the payload file there and the workers map it in place; rank 0 writes its result file
there and home maps it. Nothing is copied through the object store, whose buffers are read-only
and would cost a copy to become a model's weights.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from gpu_proxy.dataplane.base import PAYLOAD, ClusterTransport, DataPlane, SharedFolder
from gpu_proxy.dataplane.package import Package, StoredFile, read_file, write_file


class LocalFolderPlane(DataPlane):
    def __init__(self, run_name: str) -> None:
        super().__init__(run_name)
        self.folder = tempfile.mkdtemp(prefix=f"gpu-proxy-{run_name}-")  # 0700

    def send(self, payload: Package) -> StoredFile:
        return write_file(payload, os.path.join(self.folder, PAYLOAD))

    def transport(self) -> ClusterTransport:
        return SharedFolder(self.folder)

    def fetch(self, result: StoredFile) -> Package:
        return read_file(result.location, result)

    def clean(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)  # mapped results stay readable until unmapped
