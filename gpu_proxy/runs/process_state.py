"""What a pooled worker process puts back between two runs, so that nothing of one reaches the next.

The core restores what every run can change through Python itself: environment variables, the
working directory, ``sys.path``, the ``random`` module's state, and modules the run imported by
name from outside any installed package (the user's project: they are imported again, edited or
not, by the next run). A run that left files open (still open once its objects were collected)
cannot be put back safely: :meth:`ProcessState.restore` says so, and the pool replaces the process
instead of reusing it. Frameworks register what only they know (:func:`register_reset`):
``gpu_proxy_lightning`` resets torch's seeds, default dtype and process group.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import random
import stat
import sys
import sysconfig
from dataclasses import dataclass
from typing import Callable

from gpu_proxy.storage.spool import SPOOL_DIR

log = logging.getLogger(__name__)

_resets: list[Callable[[], None]] = []
_OURS = {"gpu_proxy", "gpu_proxy_lightning", "gpu_proxy_keras"}  # this library: the same code for every run


def register_reset(reset: Callable[[], None]) -> None:
    """Call ``reset`` in a pooled worker after every run (once per function, however often registered)."""
    if reset not in _resets:
        _resets.append(reset)


def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[name]) + os.sep for name in ("stdlib", "platstdlib", "purelib", "platlib")})


@dataclass
class ProcessState:
    environ: dict[str, str]
    cwd: str
    path: list[str]
    modules: frozenset[str]
    open_files: frozenset[tuple[int, int]] = frozenset()  # (device, inode) of each regular file open

    @classmethod
    def snapshot(cls) -> "ProcessState":
        return cls(dict(os.environ), os.getcwd(), list(sys.path), frozenset(sys.modules), frozenset(_open_files()))

    def restore(self) -> str | None:
        """Put the process back; returns why it cannot be reused (files the run left open), or None."""
        os.environ.clear()
        os.environ.update(self.environ)
        try:
            os.chdir(self.cwd)
        except OSError:
            pass
        sys.path[:] = self.path
        random.seed()  # as a fresh process: from the OS's entropy
        self._forget_project_modules()
        for reset in list(_resets):
            try:
                reset()
            except Exception:  # noqa: BLE001 - a reset that fails must not take the worker down
                log.warning("a worker reset failed", exc_info=True)
        self.modules = frozenset(sys.modules)  # what a reset imported is part of the warm process now
        _give_memory_back()  # after the run's objects are collected: a file nobody holds is closed
        left_open = sorted(path for file, path in _open_files().items() if file not in self.open_files)
        if not left_open:
            return None
        # Closing them here would leave their Python file objects holding descriptor numbers that
        # the next run's files get: closing one of those later would close the wrong file.
        reason = (f"the run left {len(left_open)} file(s) open ({', '.join(left_open[:5])}); "
                  "this worker process is replaced, not reused")
        log.warning(reason)  # in the worker's log: why the next run started without warm workers
        return reason

    def _forget_project_modules(self) -> None:
        installed = _installed_roots()
        for name in set(sys.modules) - self.modules:
            if name.partition(".")[0] in _OURS:
                continue
            file = getattr(sys.modules.get(name), "__file__", None)
            if file and not os.path.realpath(file).startswith(installed):
                sys.modules.pop(name, None)


_OWN_SPOOL = f"{os.sep}{SPOOL_DIR}{os.sep}"


def _open_files() -> dict[tuple[int, int], str]:
    """The user's regular files this process holds open: {(device, inode): path}; empty where /proc
    is not. Not counted: files already deleted (Ray's object store and torch share memory through
    those), and files under Python's installed packages or Ray's temp folder (a library's own log
    or data file, which it may open on first use and keep: ``ray.data``'s session log does), or in
    gpu-proxy's own upload spool (its lock lives as long as the process: storage/spool.py)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    ignored = _installed_roots() + _ray_temp_dir()
    found = {}
    for name in names:
        try:
            info = os.stat(f"/proc/self/fd/{name}")
            path = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        real = os.path.realpath(path)
        if (stat.S_ISREG(info.st_mode) and info.st_nlink > 0 and not real.startswith(ignored)
                and _OWN_SPOOL not in real):
            found[(info.st_dev, info.st_ino)] = path
    return found


def _ray_temp_dir() -> tuple[str, ...]:
    try:
        import ray

        return (os.path.realpath(ray.get_runtime_context().get_temp_dir()) + os.sep,) if ray.is_initialized() else ()
    except Exception:  # noqa: BLE001 - not in a Ray worker: no Ray files to leave out
        return ()


def _give_memory_back() -> None:
    """Free the run's objects now and hand freed heap pages back to the OS: an idle warm worker that
    held a 1 GB model must not keep 1 GB of this machine's memory while it waits."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps its own counsel
        pass
