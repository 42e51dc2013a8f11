"""Home's heartbeat on the Ray Job path: a run whose home is gone stops after a grace period.

The Jobs HTTP API is the one channel home has to the cluster, and it has no route for messages; it
stores values in the cluster's key-value store (see :mod:`gpu_proxy.runs.cluster_kv`). Home overwrites one
small "package" per run with a counter every few seconds; the job driver reads that key through
``ray.experimental.internal_kv`` and asks the run to stop when it has not changed for the grace
period. Comparing counters, not timestamps, keeps the two machines' clocks out of it.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.runs.cluster_kv import kv_key, put_value

INTERVAL_S = 2.0
MIN_GRACE_S = 3 * INTERVAL_S  # a few missed beats (a busy laptop, a slow request) are not a dead home


class HomeHeartbeat:
    """Beats while home follows a run (a daemon thread; stops with ``close()`` or the process)."""

    def __init__(self, endpoint: Endpoint, run_name: str, interval_s: float = INTERVAL_S) -> None:
        self._endpoint = endpoint
        self._run_name = run_name
        self._interval_s = interval_s
        self._count = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gpu-proxy-heartbeat-{run_name}", daemon=True)

    def start(self) -> "HomeHeartbeat":
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        self._count += 1
        try:
            put_value(self._endpoint, self._run_name, "heartbeat", str(self._count).encode())
        except OSError:  # HTTPCallError is one
            pass  # a missed beat is what the grace period is for

    def _run(self) -> None:
        while not self._closed.wait(self._interval_s):
            self.beat()

    def close(self) -> None:
        self._closed.set()


class HeartbeatWatch:
    """Driver side: calls ``on_gone`` once home's beats have stopped for ``grace_s``."""

    def __init__(self, run_name: str, grace_s: float, on_gone: Callable[[], None],
                 poll_s: float = 1.0) -> None:
        self._key = kv_key(run_name, "heartbeat")
        self._grace_s = grace_s
        self._on_gone = on_gone
        self._poll_s = poll_s
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-proxy-heartbeat-watch", daemon=True)

    def start(self) -> "HeartbeatWatch":
        self._thread.start()
        return self

    def _run(self) -> None:
        from ray.experimental import internal_kv

        last_value, last_change = None, time.monotonic()
        while not self._closed.wait(self._poll_s):
            value = internal_kv._internal_kv_get(self._key)
            if value != last_value:
                last_value, last_change = value, time.monotonic()
            elif time.monotonic() - last_change > self._grace_s:
                self._on_gone()
                return

    def close(self) -> None:
        self._closed.set()
