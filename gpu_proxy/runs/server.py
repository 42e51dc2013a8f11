"""A cluster's run server: one long-lived Ray Job driver that supervises many runs, workers kept warm.

``python -m gpu_proxy.runs.server --key KEY --host HOST`` (submitted by
:mod:`gpu_proxy.runs.server_client`). A Ray Job per run costs a job supervisor actor, an entrypoint
process and a driver's ``ray.init`` (1.3-2.5 s here) before any worker starts, and worker processes
belong to their job, so each run would import torch again. The server pays this once; its
:class:`~gpu_proxy.runs.pool.WorkerPool` keeps the workers.

One connection is one request (:mod:`gpu_proxy.runs.wire`): ``run`` (supervise a spec, stream its
events, end with its result), ``status`` (the pool and recent runs) or ``clear`` (end idle
workers). During a run home beats every few seconds; a home that closed the connection or went
silent for the run's ``home_grace_s`` is gone and the run stops as on the Job path. The server
exits once it has had no run and no warm worker for ``LINGER_S``.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import pickle
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

import ray

from gpu_proxy import events, shipping
from gpu_proxy.events import Event
from gpu_proxy.runs import wire
from gpu_proxy.runs.cluster_kv import kv_key
from gpu_proxy.runs.pool import WorkerPool, current_pool
from gpu_proxy.runs.supervisor import StopRequestCount, supervise
from gpu_proxy.secrets import installed
from gpu_proxy.versions import home_versions

log = logging.getLogger(__name__)

READY_MARKER = "gpu-proxy-server: listening "
KEY_KIND = "server-key"
LINGER_S = 30.0
HARD_STOP_AFTER_S = 60.0
RECENT_RUNS = 50


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    return tuple(home_versions().items())


def versions() -> dict[str, str]:
    """What must match between home and the cluster for a pickled run to mean the same on both: Python,
    gpu-proxy, Ray, cloudpickle and the frameworks installed (:func:`gpu_proxy.versions.home_versions`;
    home compares them with its own, :func:`gpu_proxy.runs.server_client._check_versions`)."""
    return dict(_versions())


def _find_key(identifier: str) -> bytes | None:
    from ray.experimental import internal_kv

    if not identifier.isalnum():
        return None
    return internal_kv._internal_kv_get(kv_key(identifier, KEY_KIND))


class RunServer:
    def __init__(self, host: str, pool: WorkerPool) -> None:
        self.pool = pool
        self._listener = _listen(host)
        self.address = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._active: dict[str, dict[str, Any]] = {}
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT_RUNS)
        self._stops: dict[str, StopRequestCount] = {}  # the active runs' stop request counts, for `gpu-proxy stop`
        self._last_activity = time.monotonic()

    def serve(self) -> None:
        """Accept requests until idle for ``LINGER_S`` (no run, no warm worker)."""
        self._listener.settimeout(1.0)
        while not self._idle_long_enough():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True, name="gpu-proxy-request").start()
        self._listener.close()
        self.pool.close()

    def _idle_long_enough(self) -> bool:
        with self._lock:
            if self._active or not self.pool.is_empty():
                self._last_activity = time.monotonic()
                return False
            return time.monotonic() - self._last_activity > LINGER_S

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(30)
                wire.server_handshake(conn, _find_key, {"versions": versions()})
                request = wire.receive(conn)
                conn.settimeout(None)
                op = request.get("op")
                if op == "run":
                    self._run(conn, request)
                elif op == "status":
                    wire.send(conn, self.status())
                elif op == "clear":
                    wire.send(conn, {"cleared": self.pool.clear()})
                elif op == "stop_run":
                    wire.send(conn, self._stop_run(str(request.get("run", ""))))
                else:
                    wire.send(conn, {"error": f"unknown request {op!r}"})
            except (wire.WireError, OSError) as exc:
                log.info("a request ended: %s", exc)

    def _stop_run(self, name: str) -> dict[str, Any]:
        """``gpu-proxy stop``: a graceful stop, as the run's home asking would be."""
        with self._lock:
            stop = self._stops.get(name)
            known = stop is not None or any(r["run_id"] == name for r in self._recent)
        if stop is not None:
            stop.request()
        return {"found": known, "stopped": stop is not None}

    def status(self) -> dict[str, Any]:
        with self._lock:
            runs = list(self._active.values()) + list(self._recent)
        return {"versions": versions(), "pool": self.pool.describe(), "runs": runs}

    def _run(self, conn: socket.socket, request: dict[str, Any]) -> None:
        secrets = dict(request.get("secrets") or {})
        with installed(secrets):  # before the spec: its data plane half may refer to credentials
            spec = pickle.loads(request["spec"])
            spec.secrets = secrets
            record = {"run_id": spec.name, "status": "RUNNING", "start_time": time.time(), "end_time": None}
            with self._lock:
                self._active[spec.name] = record
            try:
                self._supervise(conn, spec, record)
            finally:
                record["end_time"] = time.time()
                with self._lock:
                    self._active.pop(spec.name, None)
                    self._recent.appendleft(record)
                    self._last_activity = time.monotonic()

    def _supervise(self, conn: socket.socket, spec: Any, record: dict[str, Any]) -> None:
        stop = StopRequestCount()
        with self._lock:
            self._stops[spec.name] = stop
        send_lock = threading.Lock()
        home = _HomeWatch(conn, spec, stop)
        home.start()
        last_seq = [-1]

        def sink(event: Event) -> None:
            if event.seq < 0:
                event.seq = last_seq[0] + 1
            last_seq[0] = max(last_seq[0], event.seq)
            if home.gone:
                return
            try:
                with send_lock:
                    wire.send(conn, {"event": event.to_dict()})
            except OSError:
                home.lost("the connection to home broke")

        try:
            outcomes = supervise(spec, sink, stop, self.pool)
        except BaseException as exc:  # noqa: BLE001 - reported home
            record["status"] = "FAILED"
            sink(Event(events.RESULT, {"driver_error": shipping.pack_exception(exc)}))
            return
        finally:
            home.close()
            with self._lock:
                self._stops.pop(spec.name, None)
        if home.gone:
            record["status"] = f"STOPPED ({home.gone})"
            log.warning("gpu-proxy: stopped run %s: %s", spec.name, home.gone)
            return
        failed = any("value" not in outcome for outcome in outcomes)
        record["status"] = "FAILED" if failed else ("STOPPED" if stop.requests else "SUCCEEDED")
        sink(Event(events.RESULT, {"outcomes": outcomes, "stopped": stop.requests > 0}))


class _HomeWatch:
    """Reads home's requests during a run (stop, beats) and stops the run when home is gone."""

    def __init__(self, conn: socket.socket, spec: Any, stop: StopRequestCount) -> None:
        self._conn, self._spec, self._stop = conn, spec, stop
        self._last_beat = time.monotonic()
        self._closed = threading.Event()
        self.gone: str | None = None

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True, name="gpu-proxy-home-reader").start()
        if self._spec.home_grace_s is not None:
            threading.Thread(target=self._watch, daemon=True, name="gpu-proxy-home-watch").start()

    def close(self) -> None:
        self._closed.set()

    def lost(self, why: str) -> None:
        if self.gone is None and not self._closed.is_set():
            self.gone = why
            self._stop.request()
            threading.Thread(target=self._abort_later, daemon=True).start()

    def _abort_later(self) -> None:
        if not self._closed.wait(HARD_STOP_AFTER_S):
            self._stop.request()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                message = wire.receive(self._conn)
            except (wire.WireError, OSError):
                # A closed connection is a home that ended (a laptop that sleeps keeps it open and
                # silent: the beats' grace period is for that); the stream cannot be resumed.
                self.lost("home closed the connection")
                return
            self._last_beat = time.monotonic()
            if message.get("op") == "stop":
                self._stop.request()

    def _watch(self) -> None:
        grace = float(self._spec.home_grace_s)
        while not self._closed.wait(1.0):
            if time.monotonic() - self._last_beat > grace:
                self.lost(f"no heartbeat from home for {grace:g} s")
                return


def _listen(host: str) -> socket.socket:
    """A listening socket on ``host`` (the address home reaches the cluster at), else on this node's IP."""
    for candidate in (host, ray.util.get_node_ip_address()):
        listener = socket.socket(socket.AF_INET6 if ":" in candidate else socket.AF_INET)
        try:
            listener.bind((candidate, 0))
            listener.listen(64)
            return listener
        except OSError:
            listener.close()
    raise OSError(f"the run server could bind neither {host} nor this node's address")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_proxy.runs.server")
    parser.add_argument("--key", required=True, help="which homes' server this is (their versions)")
    parser.add_argument("--host", required=True, help="the address to listen on")
    args = parser.parse_args(argv)
    ray.init(log_to_driver=False, logging_level=logging.WARNING, namespace="gpu-proxy")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    server = RunServer(args.host, current_pool())
    host, port = server.address
    print(READY_MARKER + json.dumps({"host": host, "port": port, "versions": versions()}), flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
