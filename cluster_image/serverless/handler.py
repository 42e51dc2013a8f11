"""The gpu-proxy RunPod serverless worker: run one packaged run per job on a single-node Ray cluster.

RunPod starts this file in the worker container (``python handler.py``); ``runpod.serverless.start``
takes jobs from the endpoint's queue. For each job the handler

1. reads the run (a pickled :class:`~gpu_proxy.runs.spec.RunSpec`) from the job input, inline or
   from its fsspec URL (see :mod:`gpu_proxy.clouds.runpod.serverless.wire`);
2. starts Ray in this process on first use: a new local cluster over all the worker's GPUs and
   CPUs, token auth with a fresh token, every port on loopback; it is kept for the worker's next
   jobs (a warm worker saves the seconds Ray takes to start);
3. runs :func:`~gpu_proxy.runs.supervisor.supervise` in a thread and yields the run's events in
   batches while it goes, ``{"events": [...]}``, the ``result`` event last: the outcomes inline, or
   written to the run's storage URL when larger than the job allows.

The handler is an *async* generator so that RunPod's cancel (``/cancel/{job}``), which the SDK
delivers by cancelling the job's asyncio task, reaches it at once: the run is aborted and Ray is
shut down, so a cancelled job leaves nothing running.

Local use (no RunPod needed)::

    python handler.py --test_input '{"input": {...}}'     # one job, exit 0/1
    python handler.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port 8000

The SDK runs a ``--test_input`` job through its plain-function path, which never iterates a
generator; in that mode the handler given to the SDK drains the generator and returns the list of
outputs, which is what ``/status`` of a real endpoint returns with ``return_aggregate_stream``.

Environment: ``NUM_GPUS`` / ``NUM_CPUS`` (default: all Ray detects), ``RAY_TEMP_DIR`` (default a
new ``/tmp/gpsl-*`` folder), ``OBJECT_STORE_MEMORY_MB``; storage credentials the usual way for
fsspec (``AWS_ACCESS_KEY_ID``... set as RunPod secrets on the endpoint): the job input carries
no credentials.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
import pickle
import secrets
import sys
import tempfile
import threading
import time
from typing import Any, AsyncIterator

# Before the SDK is imported: at its default level (DEBUG) it logs every job's whole input.
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
# Before Ray is imported (it reads its auth settings then): token auth with a fresh token for the
# Ray cluster this worker starts. The raylet and Ray's workers inherit it; it is never logged and
# never leaves the container.
os.environ.pop("RAY_ADDRESS", None)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

from gpu_proxy import events, shipping  # noqa: E402
from gpu_proxy.clusters import embedded_ray  # noqa: E402
from gpu_proxy.clouds.runpod.serverless import wire  # noqa: E402
from gpu_proxy.events import Event  # noqa: E402
from gpu_proxy.runs.spec import RunSpec  # noqa: E402

BATCH_S = 0.25  # one streamed output per quarter second at most
ABORT_WAIT_S = 20.0

_ray_lock = threading.Lock()


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def start_ray() -> None:
    """A new single-node Ray cluster owned by this process (never one already on the machine)."""
    import ray

    with _ray_lock:
        if ray.is_initialized():
            return
        temp_dir = os.environ.get("RAY_TEMP_DIR") or tempfile.mkdtemp(prefix="gpsl-", dir="/tmp")
        store_mb = _int_env("OBJECT_STORE_MEMORY_MB")
        # As the embedded cluster starts (loopback only, the agent on a port of its own, no API server):
        # a cold worker's first job waits for this start.
        embedded_ray.start_ray(num_cpus=_int_env("NUM_CPUS"), num_gpus=_int_env("NUM_GPUS"), _temp_dir=temp_dir,
                               object_store_memory=store_mb * 1024 * 1024 if store_mb else None)


def stop_ray() -> None:
    import ray

    with _ray_lock:
        if ray.is_initialized():
            ray.shutdown()


class _Run:
    """One run executing in a background thread; its events wait in a deque for the next batch."""

    def __init__(self, spec: RunSpec, job_in: dict[str, Any]) -> None:
        from gpu_proxy.runs.supervisor import StopRequestCount

        self.spec = spec
        self.job_in = job_in
        self.stop = StopRequestCount()
        self.done = threading.Event()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._last_seq = -1
        self._result: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._supervise, name=f"gpu-proxy-{spec.name}", daemon=True)

    def start(self) -> "_Run":
        self._thread.start()
        return self

    def _sink(self, event: Event) -> None:
        if event.seq < 0:
            event.seq = self._last_seq + 1
        self._last_seq = max(self._last_seq, event.seq)
        self._pending.append(wire.encode_event(event))

    def _supervise(self) -> None:
        from gpu_proxy.runs.supervisor import supervise

        try:
            outcomes = supervise(self.spec, self._sink, self.stop)
            self._result = self._outcomes_result(outcomes)
        except BaseException as exc:  # noqa: BLE001 - reported home in the result
            self._result = {"driver_error": shipping.pack_exception(exc)}
        finally:
            self._result["stopped"] = self.stop.requests > 0
            self._sink(Event(events.RESULT, self._result))
            self.done.set()

    def _outcomes_result(self, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
        size = len(json.dumps(wire.encode_value(outcomes)))
        limit = self.job_in.get("result_inline_max")
        limit = wire.DEFAULT_RESULT_INLINE_MAX if limit is None else int(limit)
        url = self.job_in.get("result_url")
        if size <= limit:
            return {"outcomes": outcomes}
        if not url:
            self._sink(Event(events.LOG, {"stream": "stderr", "node": 0, "line": (
                f"gpu-proxy: the result is {size / 1e6:.1f} MB, over the {limit / 1e6:.1f} MB a job should "
                "stream; sending it anyway. Give RunPodServerless a storage_url to send it through storage.")},
                rank=0))  # a log line: every home renders those
            return {"outcomes": outcomes}
        import posixpath

        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **(self.job_in.get("storage_options") or {}))
        fs.makedirs(posixpath.dirname(path), exist_ok=True)  # a no-op on object stores; needed on file://
        fs.pipe_file(path, pickle.dumps(outcomes))
        return {"outcomes_url": url}

    def take(self) -> list[dict[str, Any]]:
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        return batch

    def abort(self) -> None:
        """Home cancelled the job: end the workers now, and Ray with them."""
        self.stop.request()
        self.stop.request()  # the second request aborts: the supervisor cancels every worker task
        self._thread.join(ABORT_WAIT_S)
        stop_ray()


class _StopCheck:
    """Home asks a run to stop by writing a file at the job's ``stop_url`` (there is no other way
    to reach a running job but ``/cancel``, which ends it at once). Looked at once a second."""

    INTERVAL_S = 1.0

    def __init__(self, job_in: dict[str, Any]) -> None:
        self.url = job_in.get("stop_url")
        self.options = job_in.get("storage_options") or {}
        self._last = 0.0
        self._asked = False

    def asked(self) -> bool:
        if self.url is None or self._asked or time.monotonic() - self._last < self.INTERVAL_S:
            return False
        self._last = time.monotonic()
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(self.url, **self.options)
            self._asked = fs.exists(path)
        except Exception:  # noqa: BLE001 - storage hiccup: look again next second
            return False
        return self._asked


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """RunPod's generator handler: the run's events while it goes, the result last."""
    spec = wire.read_spec(job.get("input") or {})
    start_ray()  # on the event loop's thread, the main one: Ray started from another thread misbehaves
    run = _Run(spec, job["input"]).start()
    stop_check = _StopCheck(job["input"])
    try:
        while not run.done.is_set():
            await asyncio.to_thread(run.done.wait, BATCH_S)
            if await asyncio.to_thread(stop_check.asked):
                run.stop.request()  # home's Ctrl-C: stop at the next step boundary, and report as usual
            batch = run.take()
            if batch:
                yield {"events": batch}
        batch = run.take()
        if batch:
            yield {"events": batch}
    finally:
        if not run.done.is_set():  # cancelled by RunPod, or the consumer went away
            run.abort()


async def run_to_end(job: dict[str, Any]) -> Any:
    """For ``--test_input``: the SDK calls the handler as a plain function there. Returns every
    output, as ``/status`` of an endpoint does; a run that failed to run is a job error (exit 1)."""
    outputs = [output async for output in handler(job)]
    for event in (e for output in outputs for e in wire.decode_events(output)):
        if event.kind == events.RESULT and "driver_error" in event.data:
            error = event.data["driver_error"]
            return {"error": f"{error['type']}: {error['message']}\n{error['traceback']}"}
    return outputs


def main() -> None:
    import runpod

    local_test = any(arg == "--test_input" or arg.startswith("--test_input=") for arg in sys.argv[1:])
    runpod.serverless.start({"handler": run_to_end if local_test else handler, "return_aggregate_stream": True})


if __name__ == "__main__":
    main()
