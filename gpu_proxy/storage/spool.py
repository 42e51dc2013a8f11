"""Local spool files for checkpoints on their way up, reclaimed when their process dies.

A checkpoint is serialised to a local file before its upload; a process killed mid-upload leaves
that file behind (a whole checkpoint's size). Each process spools into its own folder,

    <base>/gpu-proxy-spool/<pid>-<random>/        base: the temp dir, or the spool_dir asked for

holding an exclusive `flock` on `<folder>/.lock` for as long as it lives. The kernel drops the
lock when the process dies, however it dies (SIGKILL, OOM), so any process that opens a spool
can tell an abandoned folder from a live one and delete it: `sweep` runs whenever a spool is
opened (a restarted worker's first checkpoint) and when a checkpoint IO reaches a worker.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time

SPOOL_DIR = "gpu-proxy-spool"
LOCK_NAME = ".lock"
UNLOCKED_GRACE_S = 600.0  # a folder with no lock yet is being created; one that old was abandoned


def _root(base_dir: str | None) -> str:
    return os.path.join(base_dir or tempfile.gettempdir(), SPOOL_DIR)


def sweep(base_dir: str | None = None) -> list[str]:
    """Delete the spool folders under `base_dir` whose process is gone; return them."""
    root = _root(base_dir)
    removed = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        if _abandoned(entry.path):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _abandoned(folder: str) -> bool:
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            return time.time() - os.stat(folder).st_mtime > UNLOCKED_GRACE_S
        return False
    except OSError:
        return False  # not ours to judge (another user's, say)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its process is alive
    finally:
        os.close(fd)  # closing drops a lock we took
    return True


class Spool:
    """One process's spool folder, made (and abandoned ones swept) on first use."""

    def __init__(self, base_dir: str | None = None) -> None:
        self.base_dir = base_dir
        self._folder: str | None = None
        self._lock_fd: int | None = None
        self._pid: int | None = None

    def new_file(self) -> tuple[int, str]:
        """An open file descriptor and the path of a new, empty spool file."""
        if self._folder is None or self._pid != os.getpid():  # a forked child makes its own
            self._open()
        return tempfile.mkstemp(prefix="ckpt-", suffix=".ckpt", dir=self._folder)

    def _open(self) -> None:
        root = _root(self.base_dir)
        os.makedirs(root, exist_ok=True)
        sweep(self.base_dir)
        folder = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
        # Lock a file under another name, then rename it into place, so a sweeper never finds an
        # unlocked .lock in a live folder.
        fd, locking = tempfile.mkstemp(prefix=".locking-", dir=folder)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(locking, os.path.join(folder, LOCK_NAME))
        self._folder, self._lock_fd, self._pid = folder, fd, os.getpid()

    def close(self) -> None:
        """Delete this process's spool folder (call once no upload needs its files)."""
        if self._folder is not None and self._pid == os.getpid():
            shutil.rmtree(self._folder, ignore_errors=True)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
        self._folder = self._lock_fd = self._pid = None
