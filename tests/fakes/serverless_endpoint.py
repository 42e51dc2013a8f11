"""A fake RunPod serverless endpoint on 127.0.0.1 that runs the REAL handler, one process per job.

It speaks the queue-based endpoint API as RunPod serves it at ``https://api.runpod.ai/v2/{id}/...``:

* ``POST /run`` -> ``{"id", "status": "IN_QUEUE"}``; ``POST /runsync`` waits for the end (``?wait=ms``);
* ``GET|POST /status/{job}`` -> ``{"id", "status", "delayTime", "executionTime", "workerId",
  "output" | "error"}``; with ``return_aggregate_stream`` the output of a generator handler is the
  list of everything it yielded;
* ``GET|POST /stream/{job}`` -> ``{"status", "stream": [{"output": ...}, ...]}``, each output once
  (what earlier calls returned is gone), waiting up to a second for a new one;
* ``POST /cancel/{job}`` -> ``{"id", "status": "CANCELLED"}``; ``GET /health``; ``POST /purge-queue``;
* statuses IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT; 401 for a wrong key,
  404 for an unknown endpoint or job, 400 for a body without ``input``, 413 over 10 MB.

Each job runs as ``python -m tests.fakes.serverless_endpoint HANDLER`` in its own session: the
runner imports the handler module and drives its generator through the SDK's own
``run_job_generator``, as a RunPod worker does. Cancel does what the SDK does to a running job: it
cancels the job's asyncio task (the runner turns SIGUSR1 into that; Ray owns
SIGTERM in a process that started it); only a job that has not ended
``cancel_grace_s`` later is killed with its whole process group, and ``killed_hard`` records it, so
a test can tell a handler that cleaned up from one that had to be killed.

At most ``workers_max`` jobs run at once; the others wait IN_QUEUE (``workers_max=0``: nothing runs,
for purge tests).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[2]
HANDLER = ROOT / "cluster_image" / "serverless" / "handler.py"
OUTPUT_MARK = "@@job-output@@ "
AFTER_CANCEL_MARK = "@@after-cancel@@ "
MAX_RUN_BODY = 10 * 1024 * 1024
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


@dataclass
class FakeJob:
    id: str
    input: Any
    status: str = "IN_QUEUE"
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None
    unread: list[Any] = field(default_factory=list)  # outputs /stream has not returned yet
    outputs: list[Any] = field(default_factory=list)  # every output, for /status
    error: str | None = None
    process: subprocess.Popen | None = None
    killed_hard: bool = False
    #: What the worker process still had running once its cancelled job's task ended (a real worker
    #: lives on and takes the next job): {"ray_running": bool}.
    after_cancel: dict[str, Any] | None = None
    stderr_tail: str = ""

    def status_json(self) -> dict[str, Any]:
        now = time.monotonic()
        body: dict[str, Any] = {"id": self.id, "status": self.status,
                                "delayTime": int(((self.started or now) - self.created) * 1000)}
        if self.started is not None:
            body["executionTime"] = int(((self.ended or now) - self.started) * 1000)
            body["workerId"] = "fake-worker-1"
        if self.status == "COMPLETED":
            body["output"] = self.outputs
        if self.error is not None:
            body["error"] = self.error
        return body


class FakeServerlessEndpoint:
    """The endpoint ``endpoint_id`` at ``base_url`` (``http://127.0.0.1:PORT/v2``), key ``api_key``."""

    def __init__(self, endpoint_id: str = "fake-ep-1", api_key: str = "rp-fake-key-0001", *,
                 handler: Path = HANDLER, worker_env: dict[str, str] | None = None, workers_max: int = 1,
                 cancel_grace_s: float = 30.0, execution_timeout_s: float = 600.0) -> None:
        self.endpoint_id = endpoint_id
        self.api_key = api_key
        self.handler = handler
        self.worker_env = dict(worker_env or {})
        self.workers_max = workers_max
        self.cancel_grace_s = cancel_grace_s
        self.execution_timeout_s = execution_timeout_s
        self.jobs: dict[str, FakeJob] = {}
        self.requests: list[tuple[str, str]] = []
        self.retried = 0
        self._lock = threading.Condition()
        self._closed = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True),
                         threading.Thread(target=self._dispatch, daemon=True)]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v2"

    def start(self) -> "FakeServerlessEndpoint":
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            running = [job for job in self.jobs.values() if job.process is not None]
        for job in running:
            _kill_group(job.process)
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeServerlessEndpoint":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- jobs ----------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._startable():
                    self._lock.wait(0.2)
                if self._closed:
                    return
                job = self._startable()[0]
                job.status, job.started = "IN_PROGRESS", time.monotonic()
            threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def _startable(self) -> list[FakeJob]:
        running = sum(1 for job in self.jobs.values() if job.status == "IN_PROGRESS")
        queued = [job for job in self.jobs.values() if job.status == "IN_QUEUE"]
        return queued if running < self.workers_max else []

    def _run(self, job: FakeJob) -> None:
        env = dict(os.environ, **self.worker_env)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        env["RAY_TEMP_DIR"] = f"/tmp/gpsl-{job.id[-12:]}"  # names the job's Ray processes: tests find them
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.serverless_endpoint", str(self.handler), job.id],
            cwd=str(ROOT), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        with self._lock:
            job.process = process
        process.stdin.write(json.dumps({"id": job.id, "input": job.input}))
        process.stdin.close()
        stderr: list[str] = []
        drain = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
        drain.start()
        timer = threading.Timer(self.execution_timeout_s, self._time_out, args=(job,))
        timer.start()
        for line in process.stdout:
            if line.startswith(AFTER_CANCEL_MARK):
                job.after_cancel = json.loads(line[len(AFTER_CANCEL_MARK):])
            if not line.startswith(OUTPUT_MARK):
                continue
            item = json.loads(line[len(OUTPUT_MARK):])
            with self._lock:
                if job.status != "IN_PROGRESS":
                    continue  # cancelled or timed out: RunPod drops what the worker still sends
                if "error" in item:
                    job.error = item["error"]
                else:
                    job.outputs.append(item["output"])
                    job.unread.append(item["output"])
                self._lock.notify_all()
        code = process.wait()
        timer.cancel()
        drain.join(5)
        with self._lock:
            job.stderr_tail = "".join(stderr)[-4000:]
            job.ended = time.monotonic()
            if job.status == "IN_PROGRESS":
                if job.error is None and code != 0:
                    job.error = f"worker exited with code {code}: {job.stderr_tail[-1500:]}"
                job.status = "FAILED" if job.error is not None else "COMPLETED"
            job.process = None
            self._lock.notify_all()
        _kill_group(process)  # anything the job left in its session ends with it (a killed worker)
        shutil.rmtree(env["RAY_TEMP_DIR"], ignore_errors=True)

    def _stop_job(self, job: FakeJob, status: str) -> None:
        """What RunPod does on cancel or timeout: stop the job's task; kill the worker if it hangs."""
        with self._lock:
            job.status = status
            process = job.process
            self._lock.notify_all()
        if process is None:
            return
        try:
            process.send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            return
        try:
            process.wait(self.cancel_grace_s)
        except subprocess.TimeoutExpired:
            job.killed_hard = True
            _kill_group(process)

    def _time_out(self, job: FakeJob) -> None:
        if job.status == "IN_PROGRESS":
            self._stop_job(job, "TIMED_OUT")

    def wait_ended(self, job_id: str, timeout_s: float = 60.0) -> FakeJob:
        """The job, once its worker process is gone."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            job = self.jobs[job_id]
            while (job.status not in FINAL or job.process is not None) and time.monotonic() < deadline:
                self._lock.wait(0.2)
            return job

    # ---- HTTP ----------------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._serve(self, "GET")

            def do_POST(self) -> None:
                fake._serve(self, "POST")

        return Handler

    def _serve(self, request: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(request.path)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        self.requests.append((method, url.path))
        key = request.headers.get("Authorization", "")
        if key.removeprefix("Bearer ").strip() != self.api_key:
            return _reply(request, 401, {"error": "Unauthorized"})
        parts = url.path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "v2":
            return _reply(request, 404, {"error": "not found"})
        if parts[1] != self.endpoint_id:
            return _reply(request, 404, {"error": f"endpoint {parts[1]} not found"})
        operation, rest = parts[2], parts[3:]
        query = parse_qs(url.query)
        if operation in ("run", "runsync") and method == "POST" and not rest:
            return self._submit(request, body, operation == "runsync", query)
        if operation in ("status", "stream") and len(rest) == 1:
            job = self.jobs.get(rest[0])
            if job is None:
                return _reply(request, 404, {"error": "job not found"})
            return _reply(request, 200, self._stream(job) if operation == "stream" else job.status_json())
        if operation == "cancel" and method == "POST" and len(rest) == 1:
            job = self.jobs.get(rest[0])
            if job is None:
                return _reply(request, 404, {"error": "job not found"})
            if job.status not in FINAL:
                threading.Thread(target=self._stop_job, args=(job, "CANCELLED"), daemon=True).start()
                with self._lock:
                    job.status = "CANCELLED"
            return _reply(request, 200, {"id": job.id, "status": job.status})
        if operation == "health" and method == "GET" and not rest:
            return _reply(request, 200, self._health())
        if operation == "purge-queue" and method == "POST" and not rest:
            with self._lock:
                queued = [job for job in self.jobs.values() if job.status == "IN_QUEUE"]
                for job in queued:
                    del self.jobs[job.id]
            return _reply(request, 200, {"removed": len(queued), "status": "completed"})
        return _reply(request, 404, {"error": f"no operation {method} {url.path}"})

    def _submit(self, request: BaseHTTPRequestHandler, body: bytes, sync: bool, query: dict) -> None:
        if len(body) > MAX_RUN_BODY:
            return _reply(request, 413, {"error": "request body too large: the limit is 10 MB"})
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            return _reply(request, 400, {"error": "body is not JSON"})
        if not isinstance(payload, dict) or "input" not in payload:
            return _reply(request, 400, {"error": "body must have an 'input' field"})
        job = FakeJob(id=f"{uuid.uuid4()}-u1", input=payload["input"])
        with self._lock:
            self.jobs[job.id] = job
            self._lock.notify_all()
        if not sync:
            return _reply(request, 200, {"id": job.id, "status": job.status})
        deadline = time.monotonic() + int(query.get("wait", ["90000"])[0]) / 1000
        with self._lock:
            while job.status not in FINAL and time.monotonic() < deadline:
                self._lock.wait(0.2)
        return _reply(request, 200, job.status_json())

    def _stream(self, job: FakeJob) -> dict[str, Any]:
        deadline = time.monotonic() + 1.0
        with self._lock:
            while not job.unread and job.status not in FINAL and time.monotonic() < deadline:
                self._lock.wait(0.1)
            chunk, job.unread = job.unread, []
            body: dict[str, Any] = {"status": job.status, "stream": [{"output": o} for o in chunk]}
            if job.error is not None:
                body["error"] = job.error
            return body

    def _health(self) -> dict[str, Any]:
        with self._lock:
            statuses = [job.status for job in self.jobs.values()]
        running = statuses.count("IN_PROGRESS")
        return {"jobs": {"completed": statuses.count("COMPLETED"), "failed": statuses.count("FAILED"),
                         "inProgress": running, "inQueue": statuses.count("IN_QUEUE"), "retried": self.retried},
                "workers": {"idle": max(0, self.workers_max - running), "initializing": 0,
                            "ready": max(0, self.workers_max - running), "running": running,
                            "throttled": 0, "unhealthy": 0}}


def _reply(request: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---- the job runner: one RunPod worker process running one job ---------------------------------------

def _run_one_job(handler_path: str) -> int:
    import importlib.util

    # The handler first: it sets Ray's auth settings before anything imports Ray.
    module_spec = importlib.util.spec_from_file_location("gpu_proxy_serverless_handler", handler_path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    import asyncio

    from runpod.serverless.modules.rp_job import run_job_generator

    job = json.loads(sys.stdin.read())

    async def main() -> None:
        # RunPod's cancel reaches a running job as a cancel of its asyncio task (JobScaler.stop_job).
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, asyncio.current_task().cancel)
        async for item in run_job_generator(module.handler, job):
            sys.stdout.write(OUTPUT_MARK + json.dumps(item) + "\n")
            sys.stdout.flush()

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        import ray  # a real worker would now take its next job: did the handler leave Ray running?

        sys.stdout.write(AFTER_CANCEL_MARK + json.dumps({"ray_running": ray.is_initialized()}) + "\n")
        sys.stdout.flush()
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_run_one_job(sys.argv[1]))
