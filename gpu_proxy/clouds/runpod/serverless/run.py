"""One run as a RunPod serverless job: submit it, relay its streamed events home, end with its outcomes.

A thread polls ``/stream/{job}`` and puts what arrives on the run's :class:`RunControl` queue; the
caller's thread drains that queue, so events reach the user's progress bar and loggers on the thread
that made them, in order. Without storage, the first stop request (Ctrl-C) cancels the job
(``/cancel/{job}``): RunPod has no way to ask a running job to stop at a step boundary, so a
cancelled serverless run brings nothing home. With a ``storage_url`` the first stop request is
graceful instead: home writes a stop file that the handler polls, the workers stop at their next
step boundary as on the other paths, and the run's outcomes come home; the next request cancels.
"""
from __future__ import annotations

import json
import pickle
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from gpu_proxy import events, shipping
from gpu_proxy.clouds.runpod.serverless import wire
from gpu_proxy.clouds.runpod.serverless.endpoint_api import FINAL_STATES, EndpointAPI
from gpu_proxy.errors import ConfigurationError, GpuProxyError
from gpu_proxy.events import Event
from gpu_proxy.runs.control import RunControl, StopRequest
from gpu_proxy.runs.spec import RunSpec

RUNS_FOLDER = "gpu-proxy-serverless"  # under storage_url: one folder per run, removed when it ends
QUEUE_NOTICE_S = 60.0  # say so when a job waits this long for a worker


@dataclass(frozen=True)
class _Ended:
    status: Mapping[str, Any] | None
    error: BaseException | None = None


class _Storage:
    """The run's folder in the user's storage, for what does not fit in a request or a stream."""

    def __init__(self, url: str, options: Mapping[str, Any] | None, run_name: str) -> None:
        import fsspec

        self.options = dict(options or {})
        self.folder = f"{url.rstrip('/')}/{RUNS_FOLDER}/{run_name}"
        self.fs, self._path = fsspec.core.url_to_fs(self.folder, **self.options)

    def url(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def write(self, name: str, data: bytes) -> str:
        self.fs.makedirs(self._path, exist_ok=True)  # a no-op on object stores; needed on file://
        self.fs.pipe_file(f"{self._path}/{name}", data)
        return self.url(name)

    def read(self, url: str) -> bytes:
        import fsspec

        with fsspec.open(url, "rb", **self.options) as f:
            return f.read()

    def remove(self) -> None:
        try:
            self.fs.rm(self._path, recursive=True)
        except (FileNotFoundError, OSError):
            pass  # nothing was written, or the result was read and removed already


class ServerlessRun:
    def __init__(self, api: EndpointAPI, job_id: str, storage: _Storage | None, poll_s: float = 0.5) -> None:
        self.api = api
        self.job_id = job_id
        self.storage = storage
        self.poll_s = poll_s
        self.last_seq = -1

    @classmethod
    def submit(cls, api: EndpointAPI, spec: RunSpec, storage_url: str | None,
               storage_options: Mapping[str, Any] | None, max_request_bytes: int = wire.MAX_REQUEST_BYTES,
               result_inline_max: int = wire.DEFAULT_RESULT_INLINE_MAX, poll_s: float = 0.5) -> "ServerlessRun":
        storage = _Storage(storage_url, storage_options, spec.name) if storage_url else None
        spec_bytes = pickle.dumps(spec)  # RunSpec leaves its secrets out of the pickle
        secrets, secrets_url = dict(spec.secrets), None
        if storage is not None and secrets:
            secrets_url, secrets = storage.write("secrets.json", json.dumps(secrets).encode()), {}
        result_url = storage.url("result.pkl") if storage else None

        stop_url = storage.url("stop") if storage else None

        def body(inline: bool, run_url: str | None = None) -> dict[str, Any]:
            return wire.job_input(spec_bytes if inline else None, run_url, result_url, storage_options,
                                  result_inline_max, secrets, secrets_url, stop_url)

        job_input = body(inline=True)
        size = len(json.dumps({"input": job_input}))
        if size > max_request_bytes:
            if storage is None:
                raise ConfigurationError(
                    f"The run is {size / 1e6:.1f} MB packed, over the {max_request_bytes / 1e6:.1f} MB a RunPod job "
                    "request may carry. Give RunPodServerless a storage_url (e.g. 's3://bucket/gpu-proxy', with "
                    "storage_options) that both this machine and the endpoint's workers can reach; the run then "
                    "travels through it.")
            job_input = body(inline=False, run_url=storage.write("run.pkl", spec_bytes))
        try:
            job_id = api.run(job_input)
        except BaseException:
            if storage is not None:
                storage.remove()
            raise
        return cls(api, job_id, storage, poll_s)

    # ---- following -------------------------------------------------------------------------------
    def follow(self, control: RunControl) -> list[dict[str, Any]]:
        # The polling thread posts the events; the caller's thread hands them to on_event inside
        # control.items(), where a Ctrl-C in the user's callbacks becomes a stop request.
        result: dict[str, Any] = {}
        stop_polling = threading.Event()
        threading.Thread(target=self._poll, args=(control, stop_polling, result), daemon=True,
                         name=f"gpu-proxy-stream-{self.job_id}").start()
        ended: _Ended | None = None
        cancelled, stops = False, 0
        try:
            for item in control.items():
                if isinstance(item, StopRequest):
                    stops += 1
                    if stops == 1 and self.storage is not None:
                        self.storage.write("stop", b"")  # graceful: the handler stops at a step boundary
                    elif not cancelled:
                        cancelled = True
                        self.api.cancel(self.job_id)
                    elif control.interrupted:
                        raise KeyboardInterrupt("stopped following the cancelled serverless job")
                elif isinstance(item, _Ended):
                    ended = item
        except BaseException:
            if not cancelled and ended is None:  # home is going away (a callback raised): stop paying
                try:
                    self.api.cancel(self.job_id)
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            raise
        finally:
            stop_polling.set()
        try:
            return self._outcomes(ended, result, control, cancelled)
        finally:
            if self.storage is not None:
                self.storage.remove()

    def _poll(self, control: RunControl, stop: threading.Event, result: dict[str, Any]) -> None:
        queued_since, told = time.monotonic(), False
        try:
            while not stop.is_set():
                answer = self.api.stream(self.job_id)
                outputs = [chunk.get("output") for chunk in answer.get("stream") or []]
                if answer.get("status") != "IN_QUEUE":
                    queued_since = time.monotonic()
                elif not told and time.monotonic() - queued_since > QUEUE_NOTICE_S:
                    told = True
                    print(f"gpu-proxy: serverless job {self.job_id} has waited {QUEUE_NOTICE_S:.0f} s for a worker "
                          f"(a cold start, or no capacity in the endpoint's GPU pools); `gpu-proxy serverless "
                          f"health {self.api.endpoint_id}` shows its workers. Ctrl-C cancels.", file=sys.stderr)
                if outputs:
                    self._deliver(outputs, control.post, result)
                elif answer.get("status") in FINAL_STATES:
                    control.put(_Ended(self.api.status(self.job_id)))
                    return
                else:
                    stop.wait(self.poll_s)
        except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread
            control.put(_Ended(None, exc))
        finally:
            control.finish()

    def _deliver(self, outputs: list[Any], on_event: Callable[[Event], None], result: dict[str, Any]) -> None:
        for output in outputs:
            for event in wire.decode_events(output):
                if event.seq <= self.last_seq:
                    continue  # seen already (the final status repeats the whole stream)
                self.last_seq = event.seq
                if event.kind == events.RESULT:
                    result.update(event.data)
                else:
                    on_event(event)

    def _outcomes(self, ended: _Ended | None, result: dict[str, Any], control: RunControl,
                  cancelled: bool) -> list[dict[str, Any]]:
        if ended is not None and ended.error is not None:
            raise ended.error
        status = dict(ended.status or {}) if ended else {}
        state = status.get("status")
        if not result and state == "COMPLETED" and isinstance(status.get("output"), list):
            self._deliver(status["output"], control.on_event, result)  # what the stream missed
        if "driver_error" in result:
            raise shipping.unpack_exception(result["driver_error"], f"serverless job {self.job_id}")
        if "outcomes_url" in result:
            return pickle.loads(self.storage.read(result["outcomes_url"])) if self.storage else []
        if "outcomes" in result:
            return result["outcomes"]
        if cancelled:
            return []  # home raises KeyboardInterrupt (Ctrl-C) or RunStoppedError (the cluster's reason)
        error = status.get("error") or ""
        if state == "TIMED_OUT":
            raise GpuProxyError(
                f"Serverless job {self.job_id} ran past endpoint {self.api.endpoint_id}'s execution timeout and "
                "RunPod stopped it. Raise the timeout (`gpu-proxy serverless deploy ... --execution-timeout 7200`) "
                "or train for less per fit.")
        if state == "CANCELLED":
            raise GpuProxyError(f"Serverless job {self.job_id} was cancelled outside this process (the console, "
                                "or `gpu-proxy serverless purge`).")
        raise GpuProxyError(f"Serverless job {self.job_id} on endpoint {self.api.endpoint_id} ended {state or 'unknown'} "
                            f"without a result. {('RunPod says: ' + str(error)[-3000:]) if error else ''}".rstrip())
