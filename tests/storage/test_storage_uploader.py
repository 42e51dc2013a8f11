"""BackgroundUploader: uploads run behind the caller, in order, and their failures reach the caller."""
from __future__ import annotations

import os
import threading
import time

import pytest

from gpu_proxy.storage import BackgroundUploader, UploadError, latest_committed, list_committed, resolve
from gpu_proxy.storage.commit import commit_bytes
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401
from tests.support.toy_fs import toyfs  # noqa: F401

DIR = "toyfs://bucket/runs/exp1"


def _spool(tmp_path, name: str, size: int = 200_000) -> str:
    local = tmp_path / f"spool-{name}"
    local.write_bytes(name.encode() * (size // len(name)))
    return str(local)


def _submit(uploader, tmp_path, name, url_dir=DIR, options=None):
    url = f"{url_dir}/{name}"
    fs, path = resolve(url, options)
    local = _spool(tmp_path, name)
    uploader.submit_file(fs, local, path, url=url, storage_options=options)
    return local


def test_submit_returns_while_the_upload_is_still_running(toyfs, tmp_path):  # noqa: F811
    toyfs.write_gate = threading.Event()
    safety_net = threading.Timer(10, toyfs.write_gate.set)  # a blocking submit fails below instead of hanging
    safety_net.start()
    uploader = BackgroundUploader(max_pending=1)
    _submit(uploader, tmp_path, "epoch=0.ckpt")
    # Submit came back; the upload thread is stuck inside the filesystem's write.
    assert toyfs.writes_started.wait(10)
    assert uploader.pending == 1
    assert latest_committed(DIR) is None
    safety_net.cancel()
    toyfs.write_gate.set()
    uploader.wait()
    assert latest_committed(DIR) == f"{DIR}/epoch=0.ckpt"
    assert uploader.pending == 0
    uploader.close()


def test_a_full_queue_slows_the_caller_down(toyfs, tmp_path):  # noqa: F811
    toyfs.write_gate = threading.Event()
    uploader = BackgroundUploader(max_pending=1)
    _submit(uploader, tmp_path, "a.ckpt")  # running (held at the gate)
    assert toyfs.writes_started.wait(10)
    _submit(uploader, tmp_path, "b.ckpt")  # waiting in the queue
    third_done = threading.Event()
    third = threading.Thread(target=lambda: (_submit(uploader, tmp_path, "c.ckpt"), third_done.set()))
    third.start()
    assert not third_done.wait(0.5)  # blocked: one running + max_pending queued
    toyfs.write_gate.set()
    assert third_done.wait(10)
    third.join()
    uploader.close()
    assert list_committed(DIR) == [f"{DIR}/a.ckpt", f"{DIR}/b.ckpt", f"{DIR}/c.ckpt"]


def test_spool_files_are_deleted_after_commit(toyfs, tmp_path):  # noqa: F811
    uploader = BackgroundUploader()
    locals_ = [_submit(uploader, tmp_path, f"epoch={i}.ckpt") for i in range(3)]
    uploader.close()
    assert not any(os.path.exists(p) for p in locals_)


def test_removal_waits_for_the_save_before_it(toyfs, tmp_path):  # noqa: F811
    # ModelCheckpoint saves the new best, then removes the old one: the old one must stay until
    # the new one is committed, so at no instant are there fewer committed checkpoints.
    commit_bytes(resolve(DIR, None)[0], b"old", resolve(f"{DIR}/old.ckpt", None)[1])
    toyfs.write_gate = threading.Event()
    uploader = BackgroundUploader()
    _submit(uploader, tmp_path, "new.ckpt")
    fs, old_path = resolve(f"{DIR}/old.ckpt", None)
    uploader.submit_remove(fs, old_path, url=f"{DIR}/old.ckpt")
    assert toyfs.writes_started.wait(10)
    time.sleep(0.2)
    assert list_committed(DIR) == [f"{DIR}/old.ckpt"]
    toyfs.write_gate.set()
    uploader.close()
    assert list_committed(DIR) == [f"{DIR}/new.ckpt"]


def test_failure_is_raised_by_wait_and_drops_queued_removals(toyfs, tmp_path):  # noqa: F811
    fs, _ = resolve(DIR, None)
    commit_bytes(fs, b"good", resolve(f"{DIR}/good.ckpt", None)[1])
    toyfs.fail_after_bytes = 1000
    uploader = BackgroundUploader(max_pending=2)
    local = _submit(uploader, tmp_path, "bad.ckpt")
    uploader.submit_remove(fs, resolve(f"{DIR}/good.ckpt", None)[1], url=f"{DIR}/good.ckpt")
    with pytest.raises(UploadError) as info:
        uploader.wait()
    assert f"{DIR}/bad.ckpt" in str(info.value) and "simulated failure" in str(info.value)
    # The removal queued behind the failed save did not run: the last good checkpoint survives.
    assert latest_committed(DIR) == f"{DIR}/good.ckpt"
    assert not os.path.exists(local)
    # Reported once: the uploader is usable again.
    toyfs.fail_after_bytes = None
    _submit(uploader, tmp_path, "after.ckpt")
    uploader.close()
    assert latest_committed(DIR) == f"{DIR}/after.ckpt"


def test_next_submit_raises_and_teardown_does_not_repeat_it(toyfs, tmp_path):  # noqa: F811
    toyfs.fail_after_bytes = 10
    uploader = BackgroundUploader()
    _submit(uploader, tmp_path, "a.ckpt")
    deadline = time.monotonic() + 10
    with pytest.raises(UploadError):
        while time.monotonic() < deadline:  # a training loop saving again and again
            _submit(uploader, tmp_path, "b.ckpt")
            time.sleep(0.05)
    uploader.close()  # already reported to the caller: teardown stays quiet
    assert not (tmp_path / "spool-b.ckpt").exists()  # a refused checkpoint's spool file is freed too


def test_max_pending_must_be_positive():
    with pytest.raises(ValueError, match="max_pending"):
        BackgroundUploader(max_pending=0)


def test_uploads_to_s3_in_background(s3_bucket, tmp_path):  # noqa: F811
    uploader = BackgroundUploader(thread_name="uploader-under-test")
    dir_url = f"{s3_bucket.url}/runs"
    for i in range(3):
        _submit(uploader, tmp_path, f"epoch={i}.ckpt", dir_url, s3_bucket.storage_options)
    uploader.close()
    assert list_committed(dir_url, s3_bucket.storage_options) == [f"{dir_url}/epoch={i}.ckpt" for i in range(3)]
    assert not any(t.name == "uploader-under-test" for t in threading.enumerate())  # closed: thread gone
