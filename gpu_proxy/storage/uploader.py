"""Upload and commit checkpoints on a background thread, in submission order.

The caller serialises a checkpoint to a local file (fast, on its own thread) and hands it over;
the upload and commit happen behind it. One thread and FIFO order keep retention safe: a removal
submitted after a save runs only once that save has committed, so the number of committed
checkpoints never drops below what the caller had before.

After a task fails, the tasks queued behind it are dropped, not run: a queued removal must not
delete the last good checkpoint when the checkpoint meant to replace it never committed. Every
`submit_*` after a failure raises it (a training loop stops at its next checkpoint); `wait` and
`close` raise it unless a `submit_*` already did, so a teardown during exception handling does
not raise the same error a second time. `wait`/`close` then clear it.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from fsspec.spec import AbstractFileSystem

from gpu_proxy.storage import commit, removals
from gpu_proxy.storage.diagnose import storage_error
from gpu_proxy.storage.errors import UploadError


@dataclass
class _Task:
    run: Callable[[], None]
    discard: Callable[[], None]  # frees what the task holds when it is dropped or done
    url: str
    doing: str
    storage_options: dict[str, Any] | None


_STOP = object()


class BackgroundUploader:
    """A FIFO of upload/commit/remove tasks served by one daemon thread.

    `max_pending` bounds the tasks waiting behind the running one; `submit_*` blocks while the
    queue is full, so a caller that saves faster than the storage takes it is slowed down rather
    than filling the disk with spooled checkpoints.
    """

    def __init__(self, max_pending: int = 1, thread_name: str = "gpu-proxy-uploader") -> None:
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self._tasks: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._thread_name = thread_name
        self._lock = threading.Lock()
        self._failure: UploadError | None = None  # set by the thread; cleared by wait/close
        self._failure_reported = False
        self._uploading: list[tuple[AbstractFileSystem, str]] = []  # file uploads submitted, not yet done

    # -- submitting -------------------------------------------------------------------------

    def submit_file(self, fs: AbstractFileSystem, local_path: str, path: str, *, url: str,
                    storage_options: dict[str, Any] | None = None, delete_local: bool = True,
                    meta: dict[str, Any] | None = None,
                    on_commit: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        """Upload `local_path` to `path` on `fs` and commit it; `url` names it in errors.

        `on_commit(url, meta)` runs on the upload thread once the checkpoint is committed (to
        report it home, say); an exception it raises counts as an upload failure.
        """
        entry = (fs, path)

        def discard() -> None:
            with self._lock:
                with contextlib.suppress(ValueError):
                    self._uploading.remove(entry)
            if delete_local:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(local_path)

        def run() -> None:
            commit.commit_file(fs, local_path, path, meta)
            if on_commit is not None:
                on_commit(url, dict(meta or {}))

        self._submit(_Task(run, discard, url, "upload the checkpoint to", storage_options),
                     on_accept=lambda: self._uploading.append(entry))

    def submit_remove(self, fs: AbstractFileSystem, path: str, *, url: str,
                      storage_options: dict[str, Any] | None = None, durable: bool = False) -> None:
        """Un-commit and delete the checkpoint at `path`, after every task submitted before.

        `durable`: first write the removal down beside the checkpoint (see `removals`), so that it
        still happens if this process dies before it ran, once the uploads it waits for committed.
        """
        def run() -> None:
            commit.remove(fs, path)
            if durable:
                removals.done(fs, path)

        if durable:
            self._raise_failure_on_submit()
            requested_at_ns = time.time_ns()  # before listing: every upload listed commits after it
            with self._lock:
                after = [p for f, p in self._uploading if type(f) is type(fs)]
            try:
                removals.record(fs, path, after, requested_at_ns)
            except Exception as exc:  # noqa: BLE001 - in the caller's terms, like an upload failure
                raise storage_error(exc, url, storage_options, "record the removal of", UploadError) from None
        self._submit(_Task(run, lambda: None, url, "remove the checkpoint", storage_options))

    def _raise_failure_on_submit(self) -> None:
        with self._lock:
            failure = self._failure
            self._failure_reported = self._failure_reported or failure is not None
        if failure is not None:
            raise failure

    def _submit(self, task: _Task, on_accept: Callable[[], None] | None = None) -> None:
        try:
            self._raise_failure_on_submit()
        except UploadError:
            task.discard()
            raise
        self._ensure_thread()
        if on_accept is not None:
            with self._lock:
                on_accept()
        self._tasks.put(task)

    # -- waiting ----------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every submitted task is done; raise the first failure, if any."""
        self._tasks.join()
        self._raise_unreported()

    def close(self) -> None:
        """`wait`, then stop the thread. Submitting again starts a new one."""
        try:
            self._tasks.join()
        finally:
            with self._lock:
                thread, self._thread = self._thread, None
            if thread is not None:
                self._tasks.put(_STOP)
                thread.join()
        self._raise_unreported()

    @property
    def pending(self) -> int:
        """Tasks submitted and not yet finished (approximate while the thread runs)."""
        return self._tasks.unfinished_tasks

    def _raise_unreported(self) -> None:
        # Called with the queue drained, so no task is left to be dropped because of this failure.
        with self._lock:
            failure, self._failure = self._failure, None
            reported, self._failure_reported = self._failure_reported, False
        if failure is not None and not reported:
            raise failure

    # -- the thread -------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._thread_name, daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is _STOP:
                    return
                with self._lock:
                    failed = self._failure is not None
                if not failed:
                    self._run(task)
            finally:
                if task is not _STOP:
                    task.discard()
                self._tasks.task_done()

    def _run(self, task: _Task) -> None:
        try:
            task.run()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the caller
            error = storage_error(exc, task.url, task.storage_options, task.doing, UploadError)
            error.original = exc  # for debugging; its text is not shown, it may hold request details
            with self._lock:
                self._failure = error
