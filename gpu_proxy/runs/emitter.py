"""The worker's side of the event stream: non-blocking ``emit``, batched delivery.

The training thread only appends to a deque; a background thread ships batches to the run's
:class:`~gpu_proxy.runs.channel.EventChannel` every few milliseconds, in order, and brings back
home's stop request, so neither costs the training loop a round trip.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import ray

from gpu_proxy.events import Event

FLUSH_INTERVAL_S = 0.025  # batches of events: one actor call per 25 ms at most
STOP_POLL_INTERVAL_S = 0.2


class EventEmitter:
    def __init__(self, channel: Any, run: str, rank: int | None) -> None:
        self._channel = channel
        self._run_name = run
        self._rank = rank
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._stop_requested = False
        self._closed = threading.Event()
        self._last_put: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-proxy-events")
        self._thread.start()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def emit(self, kind: str, data: dict[str, Any] | None = None) -> None:
        self._queue.append(Event(kind, data or {}, rank=self._rank).to_dict())

    def _flush(self) -> None:
        batch = []
        while self._queue:
            batch.append(self._queue.popleft())
        if batch:
            self._last_put = self._channel.put.remote(self._run_name, batch)

    def _run(self) -> None:
        last_poll = 0.0
        while not self._closed.wait(FLUSH_INTERVAL_S):
            self._flush()
            now = time.monotonic()
            if now - last_poll > STOP_POLL_INTERVAL_S:
                last_poll = now
                try:
                    self._stop_requested = ray.get(self._channel.stop_requested.remote(self._run_name),
                                                   timeout=5)
                except Exception:  # noqa: BLE001 - the channel is gone: the run is ending anyway
                    pass

    def close(self) -> None:
        """Deliver everything emitted so far, then stop the background thread."""
        self._closed.set()
        self._thread.join()
        self._flush()
        if self._last_put is not None:
            ray.get(self._last_put)
