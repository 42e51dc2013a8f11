"""The serverless worker (cluster_image/serverless/handler.py) end to end through the runpod SDK's own
local modes: ``--test_input`` (one job, exit status) and ``--rp_serve_api`` (its local test server)."""
from __future__ import annotations

from gpu_proxy.runs.home import values

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from gpu_proxy import events, shipping
from gpu_proxy.clouds.runpod.serverless import wire
from gpu_proxy.runs.spec import RunSpec
from tests.support.moto_s3 import FAKE_SECRET, free_port, s3_bucket, s3_server  # noqa: F401
from tests.support.processes import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
HANDLER = ROOT / "cluster_image" / "serverless" / "handler.py"


def payload(ctx):
    print(f"hello from rank {ctx.rank}")
    return {"rank": ctx.rank, "world": ctx.world_size}


def run_input(**options) -> dict:
    spec = RunSpec(payload=shipping.dumps(payload), num_workers=1)
    options.setdefault("result_inline_max", wire.DEFAULT_RESULT_INLINE_MAX)
    return wire.job_input(pickle.dumps(spec), None, options.pop("result_url", None),
                          options.pop("storage_options", None), **options)


def handler_env(tag: str, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TEMP_DIR=f"/tmp/gpsl-{tag}", **(extra or {}))
    env.pop("RAY_ADDRESS", None)
    return env


def wait_gone(text: str, timeout_s: float = 20.0) -> list:
    """The processes still mentioning ``text`` (a Ray temp folder) after a while; the folder is removed."""
    deadline = time.monotonic() + timeout_s
    while processes_mentioning(text) and time.monotonic() < deadline:
        time.sleep(0.3)
    left = processes_mentioning(text)
    shutil.rmtree(text, ignore_errors=True)
    return left


def test_test_input_runs_one_job_and_writes_a_large_result_to_s3(s3_bucket):
    tag = uuid.uuid4().hex[:10]
    result_url = f"{s3_bucket.url}/runs/{tag}/result.pkl"
    job = {"input": run_input(result_url=result_url, storage_options=s3_bucket.storage_options,
                              result_inline_max=0)}
    text = json.dumps(job)
    assert FAKE_SECRET not in text and s3_bucket.storage_options["key"] not in text  # credentials stay home
    done = subprocess.run([sys.executable, str(HANDLER), "--test_input", text], cwd=ROOT, timeout=120,
                          env=handler_env(tag, s3_bucket.endpoint.env()), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Job local_test completed successfully" in done.stdout
    body = s3_bucket.endpoint.client().get_object(Bucket=s3_bucket.name, Key=f"runs/{tag}/result.pkl")["Body"]
    [outcome] = pickle.loads(body.read())
    assert values([outcome])[0] == {"rank": 0, "world": 1}
    assert "'outcomes_url'" in done.stdout and "hello from rank 0" in done.stdout  # the streamed events
    assert wait_gone(f"/tmp/gpsl-{tag}") == []  # the worker's Ray cluster ended with it


def test_test_input_that_is_not_a_gpu_proxy_run_fails_the_job():
    done = subprocess.run([sys.executable, str(HANDLER), "--test_input", json.dumps({"input": {"prompt": "hi"}})],
                          cwd=ROOT, timeout=60, env=handler_env("bad"), capture_output=True, text=True)
    assert done.returncode == 1
    assert "was not sent by gpu-proxy" in done.stdout + done.stderr


def post(url: str, body: dict | None = None, method: str = "POST", timeout: float = 120) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_the_sdk_local_server_runs_a_job_and_streams_its_events():
    tag = uuid.uuid4().hex[:10]
    port = free_port()
    server = subprocess.Popen([sys.executable, str(HANDLER), "--rp_serve_api", "--rp_api_host", "127.0.0.1",
                               "--rp_api_port", str(port)], cwd=ROOT, env=handler_env(tag),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/openapi.json", timeout=2).close()
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline and server.poll() is None, "the local server did not start"
                time.sleep(0.3)
        submitted = post(f"{base}/run", {"input": run_input()})
        assert submitted["status"] == "IN_PROGRESS"
        with pytest.raises(urllib.error.HTTPError) as info:  # the SDK's server has POST only (cluster_image/serverless/README.md)
            post(f"{base}/status/{submitted['id']}", method="GET")
        assert info.value.code == 405
        streamed = post(f"{base}/stream/{submitted['id']}")  # the job runs now, and all of it comes back
        assert streamed["status"] == "COMPLETED"
        got = [e for chunk in streamed["stream"] for e in wire.decode_events(chunk["output"])]
        assert [e.seq for e in got] == list(range(len(got)))
        assert got[0].kind == events.RUN_STARTED and got[-1].kind == events.RESULT
        assert {"stream": "stdout", "line": "hello from rank 0", "node": 0} in [e.data for e in got]
        [outcome] = got[-1].data["outcomes"]
        assert values([outcome])[0] == {"rank": 0, "world": 1}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert wait_gone(f"/tmp/gpsl-{tag}") == []
