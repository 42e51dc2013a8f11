"""A run as a Ray Job on a remote cluster: submit it, follow its event stream, stop it."""
from __future__ import annotations

import asyncio
import pickle
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from ray.job_submission import JobStatus, JobSubmissionClient

from gpu_proxy import events, shipping
from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.events import Event
from gpu_proxy.runs import log_codec
from gpu_proxy.runs.heartbeat import HomeHeartbeat
from gpu_proxy.runs.spec import RunSpec

_END = object()
ENTRYPOINT = "python -m gpu_proxy.runs.job_driver run.pkl"


class JobRun:
    def __init__(self, endpoint: Endpoint, job_id: str) -> None:
        self.job_id = job_id
        self._endpoint = endpoint
        self._client = JobSubmissionClient(endpoint.dashboard_url, headers=endpoint.headers())
        self.last_seq = -1

    @classmethod
    def submit(cls, endpoint: Endpoint, spec: RunSpec) -> "JobRun":
        client = JobSubmissionClient(endpoint.dashboard_url, headers=endpoint.headers())
        with tempfile.TemporaryDirectory(prefix="gpu-proxy-") as folder:
            (Path(folder) / "run.pkl").write_bytes(pickle.dumps(spec))
            job_id = client.submit_job(
                entrypoint=ENTRYPOINT, submission_id=spec.name,
                runtime_env={"working_dir": folder, "env_vars": {"PYTHONUNBUFFERED": "1"}},
                metadata={"gpu_proxy_run": spec.name})
        return cls(endpoint, job_id)

    def status(self) -> JobStatus:
        return self._client.get_job_status(self.job_id)

    def stop(self) -> None:
        self._client.stop_job(self.job_id)

    def _tail_in_background(self, inbox: "queue.Queue[Any]") -> threading.Thread:
        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(self.job_id):
                inbox.put(chunk)

        def run() -> None:
            try:
                asyncio.run(tail())
            except Exception as exc:  # noqa: BLE001 - a broken stream is resumed from the full log
                inbox.put(exc)
            finally:
                inbox.put(_END)

        thread = threading.Thread(target=run, name=f"gpu-proxy-tail-{self.job_id}", daemon=True)
        thread.start()
        return thread

    def _deliver(self, text: str, decoder: log_codec.Decoder, on_event: Callable[[Event], None],
                 result: dict[str, Any]) -> None:
        for line in text.splitlines():
            for event in decoder.feed(line):
                if event.seq <= self.last_seq:
                    continue  # already seen before a reconnect
                self.last_seq = event.seq
                if event.kind == events.RESULT:
                    result.update(event.data)
                else:
                    on_event(event)

    def follow(self, on_event: Callable[[Event], None]) -> list[dict[str, Any]]:
        """Relay the run's events from where this object last was; return the outcomes at the end."""
        result: dict[str, Any] = {}
        inbox: "queue.Queue[Any]" = queue.Queue()
        heartbeat = HomeHeartbeat(self._endpoint, self.job_id).start()  # the job id is the run's name
        try:
            return self._follow(on_event, result, inbox)
        finally:
            heartbeat.close()

    def _follow(self, on_event: Callable[[Event], None], result: dict[str, Any],
                inbox: "queue.Queue[Any]") -> list[dict[str, Any]]:
        self._tail_in_background(inbox)
        decoder, pending, interrupts = log_codec.Decoder(), "", 0
        while True:
            try:
                item = inbox.get()
                if item is _END or isinstance(item, Exception):
                    break
                pending += item
                complete, _, pending = pending.rpartition("\n")
                if complete:
                    self._deliver(complete, decoder, on_event, result)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    self.stop()  # SIGTERM to the driver: a graceful stop at the next step boundary
                else:
                    raise
        if not result:  # the live tail ended early or broke: catch up from the whole log
            self._deliver(self._client.get_job_logs(self.job_id), log_codec.Decoder(), on_event, result)
        if interrupts:
            raise KeyboardInterrupt("the remote run was stopped")
        if "driver_error" in result:
            raise shipping.unpack_exception(result["driver_error"], f"the driver of job {self.job_id}")
        if "outcomes" not in result:
            logs = self._client.get_job_logs(self.job_id)[-3000:]
            raise GpuProxyError(f"Ray Job {self.job_id} ended ({self.status()}) without a result. "
                                f"The end of its log:\n{logs}")
        return result["outcomes"]
