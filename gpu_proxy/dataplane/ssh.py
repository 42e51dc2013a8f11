"""The data plane of clusters reached over SSH: files streamed over ``ssh`` to a folder on the head.

The payload is piped into ``cat`` on the head and renamed into place when the stream ends; the
run's supervisor (the Ray Job's driver, which Ray starts on the head) checks its size and hash
before any worker reads it. Results come back the same way, into a local file that is hashed as
it arrives. No size limit but the head's disk; nothing passes through the dashboard.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import tempfile

from gpu_proxy.dataplane.base import PAYLOAD, RETENTION_DAYS, ClusterTransport, DataPlane, SharedFolder
from gpu_proxy.dataplane.package import Package, PackageError, StoredFile, read_file, write
from gpu_proxy.ssh import SSHTarget, run_remote
from gpu_proxy.ssh.errors import SSHError

#: Where run folders go on a head this project did not set up (home, not /tmp: it may be small).
DEFAULT_ROOT = "~/.cache/gpu-proxy/runs"


def resolve_root(target: SSHTarget, root: str = DEFAULT_ROOT) -> str:
    """``root`` as an absolute path on the head, made private (0700) if it did not exist."""
    expression = '"$HOME"/' + shlex.quote(root[2:]) if root.startswith("~/") else shlex.quote(root)
    result = run_remote(target, f"umask 077 && mkdir -p {expression} && cd {expression} && pwd")
    return result.stdout.strip().splitlines()[-1]


class SSHPlane(DataPlane):
    def __init__(self, run_name: str, target: SSHTarget, root: str) -> None:
        super().__init__(run_name)
        self.target = target
        self.folder = f"{root.rstrip('/')}/{run_name}"

    def send(self, payload: Package) -> StoredFile:
        final = f"{self.folder}/{PAYLOAD}"
        root = shlex.quote(self.folder.rsplit("/", 1)[0])
        # Also removes the folders of detached runs nobody attached to within the retention.
        script = (f"find {root} -mindepth 1 -maxdepth 1 -type d -mtime +{RETENTION_DAYS} -exec rm -rf {{}} + "
                  f"2>/dev/null; umask 077 && mkdir -p {shlex.quote(self.folder)} && cat > {shlex.quote(final)}.part "
                  f"&& mv -f {shlex.quote(final)}.part {shlex.quote(final)}")
        process = subprocess.Popen(self.target.ssh_command(remote_command=script), stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            size, sha256 = write(payload, process.stdin)
            process.stdin.close()
        except BrokenPipeError:
            pass  # the remote side failed: its stderr says why
        finally:
            error = process.stderr.read().decode(errors="replace")
            code = process.wait()
        if code != 0:
            raise SSHError(f"Could not send the run's payload to {self.target.destination}:{final} "
                           f"(ssh exited {code}): {error.strip()[-2000:]}")
        return StoredFile(final, size, sha256)

    def transport(self) -> ClusterTransport:
        return SharedFolder(self.folder)

    def fetch(self, result: StoredFile) -> Package:
        descriptor, local = tempfile.mkstemp(prefix="gpu-proxy-result-")
        try:
            with os.fdopen(descriptor, "wb") as file:  # ssh writes the file itself: no copy through Python
                done = subprocess.run(self.target.ssh_command(remote_command=f"cat {shlex.quote(result.location)}"),
                                      stdout=file, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise PackageError(f"Could not fetch {self.target.destination}:{result.location}: "
                                   f"{done.stderr.decode(errors='replace').strip()}")
            return read_file(local, StoredFile(f"{self.target.destination}:{result.location}", result.size,
                                               result.sha256))  # size and hash checked before use
        finally:
            os.unlink(local)  # a mapped file stays readable until it is unmapped

    def clean(self) -> None:
        try:
            run_remote(self.target, f"rm -rf -- {shlex.quote(self.folder)}", timeout_s=60)
        except SSHError:
            pass  # best effort: the folder is private, and gone with the cluster's own folder
