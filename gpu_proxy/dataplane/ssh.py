"""The data plane of clusters reached over SSH: files streamed over ``ssh`` to a folder on the head.

The payload is piped into ``tee`` on the head, which writes the file while ``sha256sum`` hashes
the same stream beside it; home compares that digest with its own before the file is used, and
the file is renamed into place only once whole. The run's supervisor (on the head) then checks
its size alone. Results come back over ``ssh cat`` into a local file that is hashed as it grows.
Hashing on either end thus runs beside the transfer, not after it. No size limit but the head's
disk; nothing passes through the dashboard.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shlex
import subprocess
import tempfile
import time

from gpu_proxy.dataplane.base import PAYLOAD, RETENTION_DAYS, ClusterTransport, DataPlane, SharedFolder
from gpu_proxy.dataplane.package import CHUNK, Package, PackageError, StoredFile, check_digest, read_file, write
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
    """The run's folder is in the head's ``/dev/shm`` when that has room for the payload and the
    result twice over (a private ``gpu-proxy-<uid>`` folder there, as the embedded cluster's), else
    under ``root``: the head writes the payload and the worker its result at memory speed (2 GB:
    ~2 s there against ~5 s to a VM's disk), and both are read back at once."""

    def __init__(self, run_name: str, target: SSHTarget, root: str, in_memory: bool = True) -> None:
        super().__init__(run_name)
        self.target = target
        self.root = root.rstrip("/")
        self.in_memory = in_memory  # False for a detached run: its results may wait days for attach
        self.folder = f"{self.root}/{run_name}"  # until send() learns which the head chose
        self._result_bytes = 0

    def check(self, payload: Package, expected_result_bytes: int = 0) -> None:
        self._result_bytes = expected_result_bytes

    def send(self, payload: Package) -> StoredFile:
        need_kb = (2 * (payload.nbytes + self._result_bytes) + (512 << 20)) // 1024 if self.in_memory else -1
        run, root = shlex.quote(self.run_name), shlex.quote(self.root)
        # Also removes the folders of detached runs nobody attached to within the retention. The shm
        # folder is used only if it is ours and no link (/dev/shm is shared by every user). tee's own
        # exit status goes to a file: a pipeline's status is its last command's (sh has no pipefail).
        script = (
            f's=/dev/shm/gpu-proxy-$(id -u); umask 077; mkdir -p {root} && mkdir -p -m 700 "$s" 2>/dev/null; '
            f'for r in {root} "$s"; do find "$r" -mindepth 1 -maxdepth 1 -type d -mtime +{RETENTION_DAYS} '
            f'-exec rm -rf {{}} + 2>/dev/null; done; d={root}/{run}; '
            f'if [ {need_kb} -ge 0 ] && [ -O "$s" ] && [ ! -L "$s" ] && [ "$(df -Pk "$s" 2>/dev/null | awk \'NR==2 {{print $4}}\')" -gt {need_kb} ] '
            f'2>/dev/null; then chmod 700 "$s" && d="$s"/{run}; fi; mkdir -p "$d" && echo "$d" && '
            f'{{ tee "$d/{PAYLOAD}.part"; echo $? > "$d/{PAYLOAD}.tee"; }} | sha256sum && '
            f'[ "$(cat "$d/{PAYLOAD}.tee")" = 0 ] && rm -f "$d/{PAYLOAD}.tee" && mv -f "$d/{PAYLOAD}.part" "$d/{PAYLOAD}"')
        process = subprocess.Popen(self.target.ssh_command(remote_command=script), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            size, sha256 = write(payload, process.stdin)
            process.stdin.close()
        except BrokenPipeError:
            pass  # the remote side failed: its stderr says why
        finally:
            said = process.stdout.read().decode(errors="replace").split("\n")
            error = process.stderr.read().decode(errors="replace")
            code = process.wait()
        if said[0].strip():
            self.folder = said[0].strip()  # clean() removes it however the send ended
        final = f"{self.folder}/{PAYLOAD}"
        if code != 0:
            raise SSHError(f"Could not send the run's payload to {self.target.destination}:{final} "
                           f"(ssh exited {code}): {error.strip()[-2000:]}")
        received = said[1].split()[:1] if len(said) > 1 else []
        if received != [sha256]:
            raise PackageError(f"{self.target.destination}:{final} does not have the content that was sent "
                               f"(SHA-256 {received} there, {sha256} here)")
        return StoredFile(final, size, sha256)

    def transport(self) -> ClusterTransport:
        return SharedFolder(self.folder, arrived_checked=True)  # hashed on the head as it arrived (send)

    def fetch(self, result: StoredFile) -> Package:
        folder = posixpath.dirname(result.location)
        if posixpath.basename(folder) == self.run_name:
            self.folder = folder  # attach: a plane made after the run learns where its results are
        descriptor, local = tempfile.mkstemp(prefix="gpu-proxy-result-")
        where = StoredFile(f"{self.target.destination}:{result.location}", result.size, result.sha256)
        try:
            with os.fdopen(descriptor, "wb") as file:  # ssh writes the file itself: no copy through Python
                process = subprocess.Popen(
                    self.target.ssh_command(remote_command=f"cat {shlex.quote(result.location)}"),
                    stdout=file, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                size, sha256 = _hash_while_written(local, process)
                error = process.stderr.read().decode(errors="replace")
            if process.wait() != 0:
                raise PackageError(f"Could not fetch {where.location}: {error.strip()}")
            check_digest(where, size, sha256)
            return read_file(local, where, checked=True)
        finally:
            os.unlink(local)  # a mapped file stays readable until it is unmapped

    def clean(self) -> None:
        try:
            run_remote(self.target, f"rm -rf -- {shlex.quote(self.folder)}", timeout_s=60)
        except SSHError:
            pass  # best effort: the folder is private, and gone with the cluster's own folder


def _hash_while_written(path: str, process: subprocess.Popen) -> tuple[int, str]:
    """Size and SHA-256 of the file ``process`` writes at ``path``, read as it grows."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while True:
            finished = process.poll() is not None  # before the read: a last write is then seen
            chunk = file.read(CHUNK)
            if chunk:
                digest.update(chunk)
                size += len(chunk)
            elif finished:
                return size, digest.hexdigest()
            else:
                time.sleep(0.005)

