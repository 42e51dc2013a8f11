"""The node's idle watcher: a pod with no run and no home for ``IDLE_TIMEOUT_S`` ends itself.

Why on the node: home may be gone (a closed laptop) exactly when the pods must stop costing
money, so the decision cannot live at home. Why without the user's API key: RunPod injects a
*pod-scoped* ``RUNPOD_API_KEY`` into every pod (https://docs.runpod.io/runpodctl: "Every Pod you
deploy comes preinstalled with the runpodctl command and a Pod-scoped API key"); it may act on
that pod only, so a leaked copy cannot touch the rest of the account. The user's key never goes
to a pod.

Idle means, on the head, all of these for ``IDLE_TIMEOUT_S`` seconds:

* no Ray Job is PENDING or RUNNING (the Jobs API on the head's loopback, with the Ray token, through
  :class:`~gpu_proxy.clusters.dashboard.DashboardClient`);
* no home heartbeat: no key ``gcs://_gpu_proxy_heartbeat_*`` in the GCS key-value store changed
  (home beats there for each run it follows, and for the cluster itself while a home process
  holds it: see ``gpu_proxy/runs/heartbeat.py``).

A worker has no Jobs API; it ends itself when its Ray node exits because the head is gone.

Ending the pod is :mod:`.pod_self`'s (the caller's ``on_idle``).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.clusters.dashboard import DashboardClient

HEARTBEAT_PREFIX = b"gcs://_gpu_proxy_heartbeat_"


def parse_seconds(text: str) -> float | None:
    """``"600"``, ``"10m"``, ``"90s"``, ``"1h"`` -> seconds; empty -> None. Raises ValueError."""
    text = (text or "").strip().lower()
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be a positive duration")
    return value


class Activity:
    """What the head reads to decide whether anyone uses the cluster."""

    def __init__(self, dashboard_url: str, gcs_address: str, token_file: str) -> None:
        self.dashboard_url = dashboard_url.rstrip("/")
        self.gcs_address = gcs_address
        self.token_file = token_file
        self._gcs = None
        self._beats: dict[bytes, bytes | None] = {}

    def _token(self) -> str:
        with open(self.token_file) as file:
            return file.read().strip()

    def running_jobs(self) -> int | None:
        """Ray Jobs PENDING or RUNNING; None when the Jobs API did not answer (counts as busy)."""
        try:
            jobs = DashboardClient(Endpoint(self.dashboard_url, self._token())).list_jobs()
        except (OSError, ValueError):  # the dashboard's errors (HTTPCallError is an OSError), a token not readable
            return None
        return sum(1 for job in jobs if job.get("status") in ("PENDING", "RUNNING"))

    def heartbeats_changed(self) -> bool:
        """Whether any home heartbeat key appeared or changed since the last call."""
        if self._gcs is None:
            # Ray's GCS client reads token auth from these variables (set before it is created).
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            os.environ.setdefault("RAY_AUTH_TOKEN_PATH", self.token_file)
            from ray._raylet import GcsClient

            self._gcs = GcsClient(address=self.gcs_address)
        beats = {}
        for key in self._gcs.internal_kv_keys(HEARTBEAT_PREFIX, None):
            beats[key] = self._gcs.internal_kv_get(key, None)
        changed = any(self._beats.get(key, b"\0new") != value for key, value in beats.items())
        self._beats = beats
        return changed


class IdleWatch:
    """Calls ``on_idle`` once the head has been idle for ``timeout_s`` (a daemon thread)."""

    def __init__(self, activity: Activity, timeout_s: float, on_idle: Callable[[], None],
                 say: Callable[[str], None], poll_s: float | None = None) -> None:
        self.activity = activity
        self.timeout_s = timeout_s
        self.on_idle = on_idle
        self.say = say
        self.poll_s = poll_s or max(0.5, min(10.0, timeout_s / 10))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-proxy-idle-watch", daemon=True)

    def start(self) -> "IdleWatch":
        self.say(f"idle watch: the pod ends itself after {self.timeout_s:g} s with no run and no home heartbeat")
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()

    def _busy(self) -> bool:
        jobs = self.activity.running_jobs()
        try:
            beating = self.activity.heartbeats_changed()
        except Exception as error:  # noqa: BLE001 - GCS not up yet, or restarting: not a reason to end
            self.say(f"idle watch: could not read heartbeats ({type(error).__name__}: {error})")
            return True
        return jobs is None or jobs > 0 or beating

    def _run(self) -> None:
        last_active = time.monotonic()
        while not self._closed.wait(self.poll_s):
            if self._busy():
                last_active = time.monotonic()
            elif time.monotonic() - last_active >= self.timeout_s:
                self.say(f"idle for {self.timeout_s:g} s (no Ray Job, no home heartbeat): ending the pod")
                self.on_idle()
                return
