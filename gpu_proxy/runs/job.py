"""A run as a Ray Job on a remote cluster: submit it, follow its event stream, stop it."""
from __future__ import annotations

import asyncio
import json
import pickle
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray.job_submission import JobStatus

from gpu_proxy import events, shipping
from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.clusters.dashboard import DashboardClient
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.events import Event
from gpu_proxy.runs import cluster_kv, log_codec
from gpu_proxy.runs.control import RunControl, StopRequest
from gpu_proxy.runs.heartbeat import HomeHeartbeat
from gpu_proxy.runs.job_driver import ABORT_KEY, HARD_STOP_AFTER_S
from gpu_proxy.runs.spec import RunSpec

ENTRYPOINT = "python -m gpu_proxy.runs.job_driver run.pkl {name}"


class JobRun:
    def __init__(self, endpoint: Endpoint, job_id: str) -> None:
        self.job_id = job_id
        self._endpoint = endpoint
        self._client = DashboardClient(endpoint).jobs()
        self.last_seq = -1

    @classmethod
    def submit(cls, endpoint: Endpoint, spec: RunSpec) -> "JobRun":
        client = DashboardClient(endpoint).jobs()
        if spec.secrets:  # beside the job, not in its package (run.pkl never holds them)
            cluster_kv.put_value(endpoint, spec.name, "secrets", json.dumps(spec.secrets).encode())
        with tempfile.TemporaryDirectory(prefix="gpu-proxy-") as folder:
            (Path(folder) / "run.pkl").write_bytes(pickle.dumps(spec))
            job_id = client.submit_job(
                entrypoint=ENTRYPOINT.format(name=spec.name), submission_id=spec.name,
                # Ray's job supervisor SIGKILLs the driver 3 s after a stop by default: too soon for a
                # graceful stop (the step in flight, interrupted.ckpt); the driver aborts on its own later.
                runtime_env={"working_dir": folder, "env_vars": {
                    "PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(int(HARD_STOP_AFTER_S) + 30)}},
                metadata={"gpu_proxy_run": spec.name})
        return cls(endpoint, job_id)

    def status(self) -> JobStatus:
        return self._client.get_job_status(self.job_id)

    def stop(self) -> bool:
        """SIGTERM to the run's driver (a graceful stop); False if the run had already ended."""
        return self._client.stop_job(self.job_id)

    def _tail_in_background(self, control: RunControl) -> threading.Thread:
        async def tail() -> None:
            async for chunk in self._client.tail_job_logs(self.job_id):
                control.put(_LogText(chunk))

        def run() -> None:
            try:
                asyncio.run(tail())
            except Exception:  # noqa: BLE001 - a broken stream is resumed from the full log
                pass
            finally:
                control.finish()

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

    def follow(self, control: "RunControl | Callable[[Event], None]", watch_only: bool = False) -> list[dict[str, Any]]:
        """Relay the run's events from where this object last was; return the outcomes at the end.

        ``control`` is the run's :class:`RunControl` (or just an event handler, e.g. for attach). A stop
        request (Ctrl-C) stops the run at its next step boundary and the outcomes still come; a second
        one aborts the run on the cluster and raises ``KeyboardInterrupt`` here. With ``watch_only``
        (attach), Ctrl-C stops watching and leaves the run going.
        """
        if not isinstance(control, RunControl):
            control = RunControl(control, self.job_id)
        heartbeat = HomeHeartbeat(self._endpoint, self.job_id).start()  # the job id is the run's name
        try:
            return self._follow(control, watch_only)
        finally:
            heartbeat.close()

    def _follow(self, control: RunControl, watch_only: bool) -> list[dict[str, Any]]:
        result: dict[str, Any] = {}
        self._tail_in_background(control)
        decoder, pending, stops = log_codec.Decoder(), "", 0
        for item in control.items():
            if isinstance(item, StopRequest):
                if watch_only and control.interrupted:
                    raise KeyboardInterrupt(f"stopped watching run {self.job_id}; it goes on (stop it with "
                                            f"`gpu-proxy stop {self.job_id} -c <cluster>`)")
                stops += 1
                if stops == 1:
                    self.stop()  # SIGTERM to the driver: a graceful stop
                else:  # Ray sends one SIGTERM per job: the abort goes through the key-value store
                    cluster_kv.put_value(self._endpoint, self.job_id, ABORT_KEY, b"1")
                if stops > 1 and control.interrupted:
                    raise KeyboardInterrupt("the remote run was aborted")
                continue
            pending += item.text
            complete, _, pending = pending.rpartition("\n")
            if complete:
                try:
                    self._deliver(complete, decoder, control.on_event, result)
                except KeyboardInterrupt:  # pressed while home's handler ran: a stop request like any other
                    control.interrupted = True
                    control.put(StopRequest(None))
        if not result:  # the live tail ended early or broke: catch up from the whole log
            self._deliver(self._client.get_job_logs(self.job_id), log_codec.Decoder(), control.on_event, result)
        if "driver_error" in result:
            raise shipping.unpack_exception(result["driver_error"], f"the driver of job {self.job_id}")
        if "outcomes" not in result:
            logs = self._client.get_job_logs(self.job_id)[-3000:]
            raise GpuProxyError(f"Ray Job {self.job_id} ended ({self.status()}) without a result. "
                                f"The end of its log:\n{logs}")
        return result["outcomes"]


@dataclass(frozen=True)
class _LogText:
    text: str
