"""Home's handle on one executing run, shared with the cluster that executes it.

Everything that happens to a run at home goes through one queue, drained on the caller's thread:
events from the run, text from a Ray Job's log, events the cluster adds (its cost meter), and
stop requests (Ctrl-C, or the cluster itself when its budget is spent). One queue keeps them in
order and keeps the user's callbacks, progress bar and loggers on the thread that created them.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from gpu_proxy.events import Event

# Python runs a signal handler on the main thread only, between bytecodes; a signal the kernel gave
# another thread (``signal.raise_signal`` from a thread, a ``kill`` that landed on one) waits until
# the main thread next runs. Waking up this often bounds how late Ctrl-C can be seen.
SIGNAL_CHECK_S = 0.1


@dataclass(frozen=True)
class StopRequest:
    """A request to stop the run: the first is graceful, a later one aborts."""

    reason: str | None  # None: the user's Ctrl-C


@dataclass(frozen=True)
class Finished:
    """The run's executor is done (its result is wherever the executor keeps it)."""


class RunControl:
    """One run's home-side queue and stop state.

    Producers (any thread): :meth:`post` (an event), :meth:`put` (anything an executor streams,
    e.g. log text), :meth:`request_stop`, :meth:`finish`. The consumer is the executor's loop on
    the caller's thread: ``for item in control.items(): ...``; events go to ``on_event`` there, the
    loop gets its own items and :class:`StopRequest` s; Ctrl-C pressed while it waits or while an
    event is handled arrives as ``StopRequest(None)``.
    """

    def __init__(self, on_event: Callable[[Event], None], run_name: str = "") -> None:
        self.on_event = on_event
        self.run_name = run_name
        self.stop_reason: str | None = None  # why the cluster stopped the run, if it did
        self.interrupted = False  # the user pressed Ctrl-C
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._lock = threading.Lock()

    def post(self, event: Event) -> None:
        """Deliver ``event`` to home's handler, in order with the run's own events."""
        self._queue.put(event)

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def finish(self) -> None:
        self._queue.put(Finished())

    def request_stop(self, reason: str) -> None:
        """Stop the run at its next step boundary, as Ctrl-C would, for ``reason``; the run's
        ``execute`` then raises :class:`~gpu_proxy.errors.RunStoppedError` with it."""
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
        self._queue.put(StopRequest(reason))

    def items(self) -> Iterator[Any]:
        """What the producers put, in order, until :meth:`finish`. Events go to ``on_event`` here;
        everything else (an executor's own items, :class:`StopRequest` s) is yielded."""
        while True:
            try:
                try:
                    item = self._queue.get(timeout=SIGNAL_CHECK_S)
                except queue.Empty:
                    continue
                if isinstance(item, Finished):
                    return
                if isinstance(item, Event):
                    self.on_event(item)
                    continue
            except KeyboardInterrupt:
                self.interrupted = True
                item = StopRequest(None)
            yield item
