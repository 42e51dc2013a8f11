"""The data plane of clusters reached over SSH: files streamed over ``ssh`` to a folder on the head.

The payload is piped into a small receiver on the head (:data:`RECEIVER`), which writes the file
while a second thread hashes the same bytes; home compares that digest with its own before the
file is used, and the file is renamed into place only once it has every byte. The run's
supervisor (on the head) then checks its size alone. Results come home from a small sender on the
head (:data:`SENDER`), which checks the result file's size, streams it followed by the payload
spans it refers to (package invariant 5: a lone worker's weights stay in the payload's pages, so
the head holds one copy of them, not two) and hashes what it streams; ``ssh`` writes the stream
into a local file that home hashes as it grows, and the two digests must agree. Hashing on either
end thus runs beside the transfer, not after it. No size limit but the head's disk; nothing
passes through the dashboard.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import posixpath
import shlex
import subprocess
import tempfile
import time

import numpy as np

from gpu_proxy.dataplane.base import PAYLOAD, RETENTION_DAYS, ClusterTransport, DataPlane, SharedFolder
from gpu_proxy.dataplane.package import (ALIGN, CHUNK, Package, PackageError, StoredFile, as_bytes_array, check_digest,
                                         header_of, padded, write)
from gpu_proxy.ssh import SSHTarget, run_remote
from gpu_proxy.ssh.errors import SSHError

#: Where run folders go on a head this project did not set up (home, not /tmp: it may be small).
DEFAULT_ROOT = "~/.cache/gpu-proxy/runs"

#: What the head runs to receive a payload: ``python3 -c RECEIVER <path> <size>``. Standard library
#: only, so any ``python3`` there will do (a Ray head has one). It writes ``<path>.part`` while a
#: second thread hashes the same bytes with OpenSSL's SHA-256, renames it to ``<path>`` only if it
#: has exactly ``<size>`` bytes, and prints its size and digest. (``tee | sha256sum`` did the same
#: in the shell, at 2-3x the time of a plain ``cat``: measured 2 GB in 15-22 s against 8 s.)
_HASHER = """
import hashlib, queue, threading
digest, chunks = hashlib.sha256(), queue.Queue(8)
def hash_chunks():
    for chunk in iter(chunks.get, None):
        digest.update(chunk)
hasher = threading.Thread(target=hash_chunks, daemon=True)  # a refusal (sys.exit) before any chunk must not wait on it
hasher.start()
"""  # both head programs hash what they move on this thread: put chunks, then None, then join

RECEIVER = _HASHER + """
import fcntl, os, sys
path, expected = sys.argv[1], int(sys.argv[2])
try:
    fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ: fewer, larger reads from ssh
except OSError:
    pass
size, source = 0, sys.stdin.buffer.raw
try:
    with open(path + ".part", "wb", buffering=0) as part:
        while True:
            block, filled = memoryview(bytearray(4 << 20)), 0
            while filled < len(block) and (n := source.readinto(block[filled:])):
                filled += n
            if filled:
                part.write(block[:filled])
                chunks.put(block[:filled])
                size += filled
            if filled < len(block):
                break
finally:
    chunks.put(None)
    hasher.join()
if size != expected:
    os.unlink(path + ".part")
    sys.exit(f"received {size} of {expected} bytes: the transfer was cut short")
os.replace(path + ".part", path)
print(size, digest.hexdigest())
"""

#: What the head runs to send a result home: ``python3 -c SENDER <path> <size>``. Standard library
#: only. It refuses a file that has not exactly ``<size>`` bytes, streams it, then the spans of the
#: payload file it refers to (its header's ``spans``, in buffer order, each padded to the package
#: alignment: what :class:`_StreamedSpans` reads), hashing on a second thread, and last prints the
#: stream's size and SHA-256 on stderr.
SENDER = _HASHER + """
import json, mmap, os, struct, sys
path, expected = sys.argv[1], int(sys.argv[2])
def mapped(name, size):
    with open(name, "rb") as file:
        found = os.fstat(file.fileno()).st_size
        if found != size:
            sys.exit(f"{name} has {found} bytes where {size} were written")
        return memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
result = mapped(path, expected)
(length,) = struct.unpack("<Q", result[8:16])
header, segments = json.loads(bytes(result[16:16 + length])), [result]
spans = header.get("spans")
if spans:
    payload = mapped(os.path.join(os.path.dirname(path), os.path.basename(spans["file"])), spans["size"])
    for size, offset in zip(header["buffers"], spans["offsets"]):
        if offset is not None:
            segments += [payload[offset:offset + size], bytes(-size %% %d)]
out, total = sys.stdout.buffer, 0
try:
    for segment in segments:
        for start in range(0, len(segment), 4 << 20):
            chunk = segment[start:start + (4 << 20)]
            out.write(chunk)
            chunks.put(chunk)
            total += len(chunk)
    out.flush()
finally:
    chunks.put(None)
    hasher.join()
print(total, digest.hexdigest(), file=sys.stderr)
""" % ALIGN


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
        # folder is used only if it is ours and no link (/dev/shm is shared by every user).
        script = (
            f's=/dev/shm/gpu-proxy-$(id -u); umask 077; mkdir -p {root} && mkdir -p -m 700 "$s" 2>/dev/null; '
            f'for r in {root} "$s"; do find "$r" -mindepth 1 -maxdepth 1 -type d -mtime +{RETENTION_DAYS} '
            f'-exec rm -rf {{}} + 2>/dev/null; done; d={root}/{run}; '
            f'if [ {need_kb} -ge 0 ] && [ -O "$s" ] && [ ! -L "$s" ] && [ "$(df -Pk "$s" 2>/dev/null | awk \'NR==2 {{print $4}}\')" -gt {need_kb} ] '
            f'2>/dev/null; then chmod 700 "$s" && d="$s"/{run}; fi; mkdir -p "$d" && echo "$d" && '
            f'python3 -c {shlex.quote(RECEIVER)} "$d/{PAYLOAD}" {payload.file_size()}')
        process = subprocess.Popen(self.target.ssh_command(remote_command=script), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        size, sha256 = -1, ""
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
        if code == 127 and "python3" in error:
            raise SSHError(f"{self.target.destination} has no python3 on the PATH of an SSH session, which "
                           "receives a run's payload there: install Python 3 on the head (Ray needs it too).")
        if code != 0:
            raise SSHError(f"Could not send the run's payload to {self.target.destination}:{final} "
                           f"(ssh exited {code}): {error.strip()[-2000:]}")
        received = said[1].split() if len(said) > 1 else []
        if received != [str(size), sha256]:
            raise PackageError(f"{self.target.destination}:{final} does not have the content that was sent "
                               f"(size and SHA-256 {received} there, {[size, sha256]} here)")
        return StoredFile(final, size, sha256)

    def transport(self) -> ClusterTransport:
        # Hashed on the head as it arrived (send); results are hashed as they are sent home (fetch).
        return SharedFolder(self.folder, arrived_checked=True, results_span_payload=True)

    def fetch(self, result: StoredFile) -> Package:
        folder = posixpath.dirname(result.location)
        if posixpath.basename(folder) == self.run_name:
            self.folder = folder  # attach: a plane made after the run learns where its results are
        descriptor, local = tempfile.mkstemp(prefix="gpu-proxy-result-")
        where = f"{self.target.destination}:{result.location}"
        try:
            with os.fdopen(descriptor, "wb") as file:  # ssh writes the file itself: no copy through Python
                process = subprocess.Popen(
                    self.target.ssh_command(
                        remote_command=f"python3 -c {shlex.quote(SENDER)} {shlex.quote(result.location)} {result.size}"),
                    stdout=file, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
                size, sha256 = _hash_while_written(local, process)
                error = process.stderr.read().decode(errors="replace")
            if process.wait() != 0:
                raise PackageError(f"Could not fetch {where}: {error.strip()[-2000:]}")
            said = error.strip().splitlines()[-1:]
            if not said or said[0].split() != [str(size), sha256]:
                raise PackageError(f"{where} did not arrive as it was sent: {size} bytes with SHA-256 {sha256} "
                                   f"here, the head said {said}")
            if result.sha256 is not None and result.spans_of is None:
                check_digest(StoredFile(where, result.size, result.sha256), size, sha256)
            return _read_streamed(local, result)
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



def _read_streamed(path: str, result: StoredFile) -> Package:
    """The package :data:`SENDER` streamed into the file at ``path``: the result file, then its spans."""
    with open(path, "rb") as file:
        view = as_bytes_array(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY))
    if len(view) < result.size:
        raise PackageError(f"{result.location} came home with {len(view)} of its {result.size} bytes")
    own = view[:result.size]

    def span_file(name: str, size: int) -> _StreamedSpans:
        if result.spans_of != name:
            raise PackageError(f"{result.location} refers to {name}, which its record does not name")
        return _StreamedSpans(view[result.size:], header_of(own)[0], size)

    if result.spans_of is None and len(view) != result.size:
        raise PackageError(f"{result.location} came home with {len(view)} bytes where {result.size} were written")
    return Package.from_bytes(own, span_file)


class _StreamedSpans:
    """The payload spans a result refers to, as :data:`SENDER` streams them after the result file
    (in buffer order, each padded to ``ALIGN``), sliced by their offsets in the payload file."""

    def __init__(self, streamed: np.ndarray, header: dict, payload_size: int) -> None:
        self._streamed, self._size, self._at = streamed, payload_size, {}
        position = 0
        for size, offset in zip(header["buffers"], header["spans"]["offsets"]):
            if offset is not None:
                self._at[(offset, size)] = position
                position += padded(size)
        if position != len(streamed):
            raise PackageError(f"the spans came home with {len(streamed)} bytes where {position} were sent")

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, where: slice) -> np.ndarray:
        start = self._at[(where.start, where.stop - where.start)]
        return self._streamed[start:start + where.stop - where.start]
