"""A real S3 HTTP endpoint for tests: moto in server mode on 127.0.0.1, in its own process.

Import the fixtures explicitly into a test module:

    from tests.support.moto_s3 import s3_server, s3_bucket  # noqa: F401

`s3_server` (session) starts one `moto_server` process on a free loopback port and yields an
`S3Endpoint`; `s3_bucket` (function) creates a fresh bucket for each test and points fsspec's
default S3 options at the server, so code that opens `s3://` URLs without storage_options
(Lightning's `ModelCheckpoint`, `load_from_checkpoint`) reaches it too.

The server runs out of process so that it does not compete with the code under test for the GIL,
and so that a test can SIGKILL a client without touching the server.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

FAKE_KEY = "AKIAFAKEFORTESTS0001"
FAKE_SECRET = "fake-secret-for-tests-never-printed-0001"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class S3Endpoint:
    url: str  # http://127.0.0.1:PORT

    @property
    def storage_options(self) -> dict:
        return {"key": FAKE_KEY, "secret": FAKE_SECRET, "client_kwargs": {"endpoint_url": self.url}}

    def env(self) -> dict[str, str]:
        """Environment for a child process whose s3fs must reach this server."""
        return {"AWS_ENDPOINT_URL_S3": self.url, "AWS_ACCESS_KEY_ID": FAKE_KEY,
                "AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=FAKE_KEY,
                            aws_secret_access_key=FAKE_SECRET, region_name="us-east-1")


@dataclass(frozen=True)
class S3Bucket:
    endpoint: S3Endpoint
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    @property
    def storage_options(self) -> dict:
        return self.endpoint.storage_options


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # The server must not outlive a test run that was killed.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_moto_server(extra_env: dict[str, str] | None = None,
                      timeout_s: float = 30.0) -> tuple[subprocess.Popen, S3Endpoint]:
    """Start `moto_server` on a free loopback port; return the process and its endpoint."""
    moto = Path(sys.executable).with_name("moto_server")
    env = dict(os.environ, **(extra_env or {}))
    for attempt in range(3):
        port = free_port()
        proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)
        endpoint = S3Endpoint(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"{endpoint.url}/moto-api/", timeout=1).close()
                return proc, endpoint
            except OSError:
                time.sleep(0.1)
        stop_process(proc)  # port taken between free_port() and bind, or too slow: try another
    raise RuntimeError("moto_server did not start on 127.0.0.1")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    proc, endpoint = start_moto_server()
    try:
        yield endpoint
    finally:
        stop_process(proc)


@pytest.fixture
def s3_bucket(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    import fsspec.config
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    # fsspec applies conf[protocol] to every new filesystem instance, so `s3://` URLs opened by
    # Lightning without storage_options reach the test server.
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(s3_server.storage_options))
    yield S3Bucket(s3_server, name)
