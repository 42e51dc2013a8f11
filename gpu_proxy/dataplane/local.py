"""The embedded cluster's data plane: a private folder on this machine, shared by home and workers.

Home writes the payload file there and the workers map it in place; rank 0 writes its result file
there and home maps it. Nothing is copied through the object store, whose buffers are read-only
and would cost a copy to become a model's weights. Neither file leaves this machine, so neither is
hashed (package invariant 4); a lone worker writes its weights into the payload file itself, and
its result refers to them there (invariant 5).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from gpu_proxy.dataplane.base import PAYLOAD, SHARED_MEMORY, ClusterTransport, DataPlane, SharedFolder
from gpu_proxy.dataplane.package import Package, StoredFile, read_file, write_file

# The folder is memory-backed when the machine has one with room: the files are read back at once,
# and a disk would add writeback to every byte (measured: 2 GB written and hashed in 2.1 s there,
# 5.1 s on /tmp).


def _run_folder_root(size_hint: int) -> str | None:
    try:
        usage = shutil.disk_usage(SHARED_MEMORY)
    except OSError:
        return None
    return SHARED_MEMORY if usage.free > 2 * size_hint + (512 << 20) else None


class LocalFolderPlane(DataPlane):
    def __init__(self, run_name: str, size_hint: int = 0) -> None:
        super().__init__(run_name)
        # 0700; payload and result both live here until the run ends
        self.folder = tempfile.mkdtemp(prefix=f"gpu-proxy-{run_name}-", dir=_run_folder_root(size_hint))

    def send(self, payload: Package) -> StoredFile:
        return write_file(payload, os.path.join(self.folder, PAYLOAD), hashed=False)

    def transport(self) -> ClusterTransport:
        return SharedFolder(self.folder, results_span_payload=True)  # home maps them where they lie

    def fetch(self, result: StoredFile) -> Package:
        return read_file(result.location, result)

    def clean(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)  # mapped results stay readable until unmapped
