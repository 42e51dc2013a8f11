"""The commit protocol on file://, memory://, S3 (moto server) and a custom fsspec filesystem."""
from __future__ import annotations

import json
import time
import uuid

import fsspec
import pytest

from gpu_proxy.storage import (COMMITS_DIR, STAGING_DIR, commit_bytes, commit_file, is_committed,
                               latest_committed, list_committed, remove_committed, remove_orphans, resolve)
from gpu_proxy.storage.commit import committed_in
from gpu_proxy.storage.location import join
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401
from tests.support.toy_fs import toyfs  # noqa: F401

BACKENDS = ["file", "memory", "s3", "toyfs"]


@pytest.fixture(params=BACKENDS)
def location(request, tmp_path):
    """(dir_url, storage_options) of an empty checkpoint directory on each backend."""
    if request.param == "file":
        return f"file://{tmp_path}/ckpts", None
    if request.param == "memory":
        return f"memory://commit-tests/{uuid.uuid4().hex}/ckpts", None
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"{bucket.url}/runs/exp1", bucket.storage_options
    request.getfixturevalue("toyfs")
    return "toyfs://bucket/runs/exp1", None


def _commit(dir_url, options, name, data):
    fs, path = resolve(join(dir_url, name), options)
    commit_bytes(fs, data, path)


def _read(url, options) -> bytes:
    fs, path = resolve(url, options)
    return fs.cat_file(path)


def test_commit_makes_a_plain_readable_file_and_lists_it(location):
    dir_url, options = location
    assert latest_committed(dir_url, options) is None
    _commit(dir_url, options, "epoch=0.ckpt", b"first")
    _commit(dir_url, options, "epoch=1.ckpt", b"second")
    assert list_committed(dir_url, options) == [f"{dir_url}/epoch=0.ckpt", f"{dir_url}/epoch=1.ckpt"]
    assert latest_committed(dir_url, options) == f"{dir_url}/epoch=1.ckpt"
    # The payload sits at the exact URL asked for: any reader opens it without knowing markers.
    assert _read(f"{dir_url}/epoch=0.ckpt", options) == b"first"
    assert is_committed(f"{dir_url}/epoch=1.ckpt", options)


def test_latest_is_by_commit_order_not_by_name(location):
    dir_url, options = location
    _commit(dir_url, options, "z.ckpt", b"old")
    time.sleep(0.01)
    _commit(dir_url, options, "a.ckpt", b"new")
    assert latest_committed(dir_url, options) == f"{dir_url}/a.ckpt"
    time.sleep(0.01)
    _commit(dir_url, options, "z.ckpt", b"newest")  # same name again, as ModelCheckpoint does for last.ckpt
    assert latest_committed(dir_url, options) == f"{dir_url}/z.ckpt"
    assert _read(f"{dir_url}/z.ckpt", options) == b"newest"
    assert len(list_committed(dir_url, options)) == 2


def test_a_file_without_marker_is_not_committed(location):
    dir_url, options = location
    _commit(dir_url, options, "good.ckpt", b"good")
    fs, path = resolve(dir_url, options)
    fs.pipe_file(join(path, "written-by-someone-else.ckpt"), b"unknown state")
    fs.pipe_file(join(path, f"{COMMITS_DIR}/garbled.ckpt.json"), b'{"format": "gpu-proxy-co')
    fs.pipe_file(join(path, "garbled.ckpt"), b"payload of a marker cut short")
    assert list_committed(dir_url, options) == [f"{dir_url}/good.ckpt"]
    assert not is_committed(f"{dir_url}/written-by-someone-else.ckpt", options)


def test_retention_removes_marker_and_payload(location):
    dir_url, options = location
    for i in range(3):
        _commit(dir_url, options, f"epoch={i}.ckpt", b"x" * (i + 1))
    remove_committed(f"{dir_url}/epoch=0.ckpt", options)
    remove_committed(f"{dir_url}/never-existed.ckpt", options)  # not an error
    assert list_committed(dir_url, options) == [f"{dir_url}/epoch=1.ckpt", f"{dir_url}/epoch=2.ckpt"]
    fs, path = resolve(dir_url, options)
    fs.invalidate_cache()
    assert not fs.exists(join(path, "epoch=0.ckpt"))
    assert not fs.exists(join(path, f"{COMMITS_DIR}/epoch=0.ckpt.json"))


def test_commit_from_a_local_file(location, tmp_path):
    dir_url, options = location
    local = tmp_path / "spooled.ckpt"
    local.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    fs, path = resolve(f"{dir_url}/big.ckpt", options)
    commit_file(fs, str(local), path)
    assert _read(f"{dir_url}/big.ckpt", options) == local.read_bytes()
    marker = json.loads(_read(f"{dir_url}/{COMMITS_DIR}/big.ckpt.json", options))
    assert marker["size"] == 2**20 and marker["name"] == "big.ckpt"
    fs.invalidate_cache()
    assert not fs.exists(join(path.rsplit("/", 1)[0], STAGING_DIR)) or not fs.ls(
        join(path.rsplit("/", 1)[0], STAGING_DIR))


def test_remove_orphans(location):
    dir_url, options = location
    fs, path = resolve(dir_url, options)
    _commit(dir_url, options, "kept.ckpt", b"kept")
    old_staging = join(path, f"{STAGING_DIR}/a.ckpt.{time.time_ns() - 7200 * 10**9}.deadbeef.partial")
    young_staging = join(path, f"{STAGING_DIR}/b.ckpt.{time.time_ns()}.cafebabe.partial")
    lone_marker = join(path, f"{COMMITS_DIR}/gone.ckpt.json")
    for p in (old_staging, young_staging, lone_marker):
        fs.pipe_file(p, b"left by a killed writer")
    deleted = remove_orphans(dir_url, options, min_age_s=3600)
    assert sorted(p.rsplit("/", 1)[1] for p in deleted) == sorted(
        [old_staging.rsplit("/", 1)[1], "gone.ckpt.json"])
    fs.invalidate_cache()
    assert fs.exists(young_staging)  # may belong to a writer that is still running
    assert list_committed(dir_url, options) == [f"{dir_url}/kept.ckpt"]


def test_failed_upload_of_a_new_name_keeps_previous_committed(toyfs, tmp_path):  # noqa: F811
    dir_url = "toyfs://bucket/runs/exp1"
    _commit(dir_url, None, "epoch=0.ckpt", b"good" * 1000)
    local = tmp_path / "next.ckpt"
    local.write_bytes(b"n" * 10**6)
    toyfs.fail_after_bytes = 1000
    fs, path = resolve(f"{dir_url}/epoch=1.ckpt", None)
    with pytest.raises(OSError, match="simulated failure"):
        commit_file(fs, str(local), path)
    assert latest_committed(dir_url) == f"{dir_url}/epoch=0.ckpt"
    assert not fs.exists(path)  # never published: the partial bytes stayed in staging
    assert _read(f"{dir_url}/epoch=0.ckpt", None) == b"good" * 1000


def test_failed_upload_of_the_same_name_keeps_it_committed(toyfs, tmp_path):  # noqa: F811
    # On a filesystem with no atomic replace the old marker goes only once the new payload is staged.
    dir_url = "toyfs://bucket/runs/exp1"
    _commit(dir_url, None, "last.ckpt", b"previous")
    local = tmp_path / "next.ckpt"
    local.write_bytes(b"n" * 10**6)
    toyfs.fail_after_bytes = 5000
    fs, path = resolve(f"{dir_url}/last.ckpt", None)
    with pytest.raises(OSError):
        commit_file(fs, str(local), path)
    assert latest_committed(dir_url) == f"{dir_url}/last.ckpt"
    assert _read(f"{dir_url}/last.ckpt", None) == b"previous"


def test_commits_by_another_process_are_seen_through_cached_listings(s3_bucket):  # noqa: F811
    # Two filesystem instances stand for two processes; each caches directory listings.
    dir_url = f"{s3_bucket.url}/runs/shared"
    reader = fsspec.filesystem("s3", skip_instance_cache=True, **s3_bucket.storage_options)
    writer = fsspec.filesystem("s3", skip_instance_cache=True, **s3_bucket.storage_options)
    dir_path = dir_url[len("s3://"):]
    commit_bytes(writer, b"one", f"{dir_path}/a.ckpt")
    assert [c.name for c in committed_in(reader, dir_path)] == ["a.ckpt"]  # reader now caches listings
    commit_bytes(writer, b"two", f"{dir_path}/b.ckpt")
    assert [c.name for c in committed_in(reader, dir_path)] == ["a.ckpt", "b.ckpt"]
