"""The driver of a run submitted as a Ray Job: ``python -m gpu_proxy.runs.job_driver run.pkl RUN_NAME``.

It runs the same supervisor as the embedded path and writes the event stream, the outcomes
last, to its stdout, which is the job's log (see :mod:`gpu_proxy.runs.log_codec`). SIGTERM,
which ``ray job stop`` sends, is home's stop request.
"""
from __future__ import annotations

import json
import logging
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import ray

from gpu_proxy import events, shipping
from gpu_proxy.events import Event
from gpu_proxy.runs import cluster_kv, log_codec
from gpu_proxy.runs.heartbeat import HeartbeatWatch
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.runs.supervisor import StopRequestCount, supervise
from gpu_proxy.secrets import install

HARD_STOP_AFTER_S = 60.0
ABORT_KEY = "abort"  # home's second Ctrl-C: Ray delivers only one SIGTERM per job


#: How the driver's last log line names a stop nobody at home asked for; the Ray Job then ends FAILED
#: with this line in its message, which ``gpu_proxy.runs.attach.list_runs`` shows as STOPPED.
STOPPED_MARKER = "gpu-proxy: stopped: "
STOPPED_EXIT_CODE = 3


class _LogSink:
    def __init__(self) -> None:
        self.last_seq = -1
        self.last_checkpoint: str | None = None

    def __call__(self, event: Event) -> None:
        if event.kind == events.CHECKPOINT:
            self.last_checkpoint = event.data.get("url") or self.last_checkpoint
        if event.seq < 0:
            event.seq = self.last_seq + 1
        self.last_seq = max(self.last_seq, event.seq)
        for line in log_codec.encode(event):
            sys.stdout.write(line + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    run_pickle, run_name = argv[0], argv[1]
    spec_bytes = Path(run_pickle).read_bytes()  # before ray.init(), which may change the working directory
    stop = StopRequestCount()
    signal.signal(signal.SIGTERM, lambda *_: stop.request())
    sink = _LogSink()
    watch = None
    done = threading.Event()  # the run is over: the abort watch ends before Ray does
    gone: list[str] = []  # why home's watch stopped the run, if it did
    try:
        ray.init(log_to_driver=False, logging_level=logging.WARNING)
        # ray.init() installs its own SIGTERM handler (sys.exit): put back the graceful stop.
        signal.signal(signal.SIGTERM, lambda *_: stop.request())
        # Before the spec: its data plane half may refer to credentials (gpu_proxy.secrets).
        secrets = json.loads(cluster_kv.take_value(run_name, "secrets") or b"{}")
        install(secrets)
        spec = pickle.loads(spec_bytes)
        spec.secrets = secrets
        threading.Thread(target=_watch_for_abort, args=(run_name, stop, done), daemon=True,
                         name="gpu-proxy-abort").start()
        if spec.home_grace_s is not None:
            watch = HeartbeatWatch(spec.name, spec.home_grace_s, lambda: _home_gone(spec, stop, gone)).start()
        outcomes = supervise(spec, sink, stop)
    except BaseException as exc:  # noqa: BLE001 - reported home, then the job fails
        sink(Event(events.RESULT, {"driver_error": shipping.pack_exception(exc)}))
        return 1
    finally:
        done.set()
        if watch is not None:
            watch.close()
    if gone:  # before the result: whoever attaches later reads why the run ended early
        reason = gone[0] + (f"; checkpoint {sink.last_checkpoint}" if sink.last_checkpoint else "")
        sink(Event(events.STOPPED, {"reason": reason, "checkpoint": sink.last_checkpoint}))
    sink(Event(events.RESULT, {"outcomes": outcomes, "stopped": stop.requests > 0}))
    if gone:
        print(STOPPED_MARKER + reason, flush=True)
        return STOPPED_EXIT_CODE
    return 0


def _watch_for_abort(run_name: str, stop: StopRequestCount, done: threading.Event) -> None:
    from ray.experimental import internal_kv

    key = cluster_kv.kv_key(run_name, ABORT_KEY)
    while not done.wait(0.5):
        try:
            asked = internal_kv._internal_kv_get(key) is not None
        except Exception:  # noqa: BLE001 - Ray going away with the driver: nothing left to abort
            return
        if asked:
            stop.request()
            stop.request()  # two requests: the supervisor ends every rank now
            return


def _home_gone(spec: RunSpec, stop: StopRequestCount, gone: list[str]) -> None:
    """Home stopped following: stop at the next step boundary, as Ctrl-C would; abort if that hangs."""
    gone.append(f"no heartbeat from home for {spec.home_grace_s:g} s")
    print(f"gpu-proxy: {gone[0]}: stopping run {spec.name}", file=sys.stderr, flush=True)
    stop.request()
    time.sleep(HARD_STOP_AFTER_S)
    stop.request()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
