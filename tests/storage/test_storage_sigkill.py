"""A process SIGKILLed in the middle of an upload leaves the previous checkpoint committed and loadable.

The child commits a small checkpoint, then starts uploading a large one; the parent waits until
the upload is visibly under way (S3: a multipart upload with parts on the server; local: a
partial staging file), kills the child with SIGKILL, and checks what a resuming run would see.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gpu_proxy.storage import STAGING_DIR, latest_committed, list_committed, resolve
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401
from tests.support.toy_fs import SlowLocalFileSystem  # noqa: F401  (registers slowfile://)

ROOT = Path(__file__).resolve().parents[2]
BIG_MB = 160  # several 50 MiB parts for s3fs's multipart upload

CHILD = textwrap.dedent("""
    import json, os, sys, tempfile, torch
    import tests.support.toy_fs  # registers slowfile://
    from gpu_proxy.storage import commit_file, resolve

    dir_url, first, second, big_mb = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    options = json.loads(os.environ.get("TEST_STORAGE_OPTIONS", "null"))

    def save(state, name):
        fd, local = tempfile.mkstemp(suffix=".ckpt")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        fs, path = resolve(f"{dir_url}/{name}", options)
        commit_file(fs, local, path)

    save({"step": 1, "weights": torch.arange(1000.0)}, first)
    print("committed-first", flush=True)
    big = {"step": 2, "weights": torch.ones(big_mb * 2**20 // 4)}
    print("uploading-second", flush=True)
    save(big, second)
    print("committed-second", flush=True)
""")


def _start_child(dir_url: str, first: str, second: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, dir_url, first, second, str(BIG_MB)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen, line: str) -> None:
    for got in proc.stdout:
        if got.strip() == line:
            return
    raise AssertionError(f"child exited (rc={proc.wait()}) before printing {line!r}")


def _kill_when(proc: subprocess.Popen, upload_under_way, timeout_s: float = 60) -> None:
    try:
        _wait_for_line(proc, "uploading-second")
        deadline = time.monotonic() + timeout_s
        while not upload_under_way():
            assert proc.poll() is None, "the child finished its upload before it could be killed"
            assert time.monotonic() < deadline, "the upload never showed up on the storage"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def _load(url: str, options) -> dict:
    fs, path = resolve(url, options)
    return torch.load(io.BytesIO(fs.cat_file(path)), weights_only=True)


@pytest.mark.parametrize("second", ["last.ckpt", "epoch=1.ckpt"], ids=["same-name", "new-name"])
def test_sigkill_during_s3_upload(s3_bucket, second):  # noqa: F811
    dir_url = f"{s3_bucket.url}/runs/exp1"
    client = s3_bucket.endpoint.client()

    def multipart_has_parts() -> bool:
        uploads = client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", [])
        return any(client.list_parts(Bucket=s3_bucket.name, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
                   for u in uploads)

    env = dict(os.environ, **s3_bucket.endpoint.env(), PYTHONPATH=str(ROOT))
    _kill_when(_start_child(dir_url, "last.ckpt", second, env), multipart_has_parts)

    options = s3_bucket.storage_options
    assert latest_committed(dir_url, options) == f"{dir_url}/last.ckpt"
    assert list_committed(dir_url, options) == [f"{dir_url}/last.ckpt"]
    assert _load(f"{dir_url}/last.ckpt", options)["step"] == 1
    fs, path = resolve(dir_url, options)
    fs.invalidate_cache()
    if second != "last.ckpt":
        assert not fs.exists(f"{path}/{second}")  # an unfinished multipart upload is no object
    # What the kill leaves is an abandoned multipart upload, invisible to readers (a bucket
    # lifecycle rule for incomplete uploads reclaims its space).
    assert client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads")


@pytest.mark.parametrize("second", ["last.ckpt", "epoch=1.ckpt"], ids=["same-name", "new-name"])
def test_sigkill_during_local_upload(tmp_path, second):
    dir_url = f"slowfile://{tmp_path}/ckpts"
    staging = tmp_path / "ckpts" / STAGING_DIR

    def partial_file_growing() -> bool:
        return any(p.stat().st_size > 0 for p in staging.glob("*.partial")) if staging.exists() else False

    env = dict(os.environ, PYTHONPATH=str(ROOT), SLOWFILE_MBPS="40")
    _kill_when(_start_child(dir_url, "last.ckpt", second, env), partial_file_growing)

    assert latest_committed(dir_url) == f"{dir_url}/last.ckpt"
    assert latest_committed(f"file://{tmp_path}/ckpts") == f"file://{tmp_path}/ckpts/last.ckpt"
    assert _load(f"{dir_url}/last.ckpt", None)["step"] == 1
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir() if not p.name.startswith(".")) == ["last.ckpt"]
    assert list(staging.glob("*.partial"))  # left for remove_orphans
