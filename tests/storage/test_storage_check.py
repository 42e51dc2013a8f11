"""check_writable: a checkpoint location that cannot work fails early, naming the URL and the cause."""
from __future__ import annotations

import importlib
import sys

import pytest

from gpu_proxy.storage import StorageError, check_writable
from gpu_proxy.storage.errors import UploadError
from gpu_proxy.storage.location import resolve
from gpu_proxy.storage.uploader import BackgroundUploader
from tests.support.moto_s3 import FAKE_KEY, FAKE_SECRET, free_port, s3_bucket, s3_server  # noqa: F401
from tests.support.moto_s3 import start_moto_server, stop_process
from tests.support.toy_fs import toyfs  # noqa: F401

SECRET = "very-secret-value-0123456789"


def _no_probe_left(fs, path: str) -> bool:
    return not any(".gpu-proxy-write-probe-" in p for p in fs.find(path))


@pytest.fixture(scope="module")
def s3_server_with_auth():
    """A second moto server that checks credentials: every key it is shown is unknown to it."""
    proc, endpoint = start_moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield endpoint
    finally:
        stop_process(proc)


def test_writable_locations_pass_and_leave_nothing(tmp_path, s3_bucket, toyfs):  # noqa: F811
    locations = [
        (f"file://{tmp_path}/runs/new-dir", None),
        (str(tmp_path / "plain-path"), None),
        ("memory://check/ok", None),
        (f"{s3_bucket.url}/runs/exp1", s3_bucket.storage_options),
        ("toyfs://bucket/runs", None),
    ]
    for url, options in locations:
        check_writable(url, options)
        fs, path = resolve(url, options)
        assert _no_probe_left(fs, path), url
    assert (tmp_path / "runs" / "new-dir").is_dir()  # created, as a run would need it


def test_unknown_protocol_lists_close_ones():
    with pytest.raises(StorageError) as info:
        check_writable("s4://bucket/runs")
    error = info.value
    assert error.reason == "unknown_protocol"
    assert "s4://bucket/runs" in str(error) and "'s4://'" in str(error)
    assert "s3://" in str(error)


def test_missing_extra_names_the_pip_command(monkeypatch):
    # Make s3fs unimportable, as on a machine where the [s3] extra was not installed.
    monkeypatch.setitem(sys.modules, "s3fs", None)
    registry_module = importlib.import_module("fsspec.registry")  # `fsspec.registry` is a mapping view
    monkeypatch.delitem(registry_module._registry, "s3", raising=False)
    with pytest.raises(StorageError) as info:
        check_writable("s3://bucket/runs", {"secret": SECRET})
    assert info.value.reason == "missing_extra"
    assert 'pip install "gpu-proxy[s3]"' in str(info.value)
    assert "s3://bucket/runs" in str(info.value)


def test_missing_bucket(s3_server):  # noqa: F811
    options = dict(s3_server.storage_options)
    with pytest.raises(StorageError) as info:
        check_writable("s3://no-such-bucket-here/runs", options)
    error = info.value
    assert error.reason == "no_bucket"
    assert "s3://no-such-bucket-here/runs" in str(error) and "bucket does not exist" in str(error)
    assert FAKE_SECRET not in str(error) and FAKE_KEY not in str(error)


def test_rejected_credentials_never_echo_them(s3_server_with_auth):
    options = {"key": "AKIAWRONGKEY00000001", "secret": SECRET,
               "client_kwargs": {"endpoint_url": s3_server_with_auth.url}}
    with pytest.raises(StorageError) as info:
        check_writable("s3://some-bucket/runs", options)
    error = info.value
    assert error.reason == "credentials"
    assert "s3://some-bucket/runs" in str(error) and "credentials were rejected" in str(error)
    for text in (str(error), repr(error.args)):
        assert SECRET not in text and "AKIAWRONGKEY00000001" not in text
    assert error.__cause__ is None and error.__suppress_context__


def test_unreachable_endpoint(s3_server):  # noqa: F811
    closed = f"http://127.0.0.1:{free_port()}"
    # Few retries keep the test short; the classification does not depend on them.
    options = {"key": FAKE_KEY, "secret": SECRET,
               "client_kwargs": {"endpoint_url": closed},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    with pytest.raises(StorageError) as info:
        check_writable("s3://bucket-x/runs", options)
    assert info.value.reason == "unreachable"
    assert "s3://bucket-x/runs" in str(info.value) and "could not be reached" in str(info.value)
    assert SECRET not in str(info.value)


def test_password_in_url_or_options_is_redacted():
    # sshfs connects when the filesystem is created: a refused port fails inside resolve().
    port = free_port()
    for url, options in [(f"sftp://alice:{SECRET}@127.0.0.1:{port}/runs", None),
                         (f"sftp://alice@127.0.0.1:{port}/runs", {"password": SECRET})]:
        with pytest.raises(StorageError) as info:
            check_writable(url, options)
        assert info.value.reason == "unreachable"
        assert SECRET not in str(info.value) and f"127.0.0.1:{port}/runs" in str(info.value)


def test_upload_error_from_real_s3_hides_credentials(s3_server_with_auth, tmp_path):
    options = {"key": "AKIAWRONGKEY00000002", "secret": SECRET,
               "client_kwargs": {"endpoint_url": s3_server_with_auth.url}}
    fs, path = resolve("s3://some-bucket/runs/a.ckpt", options)
    local = tmp_path / "a.ckpt"
    local.write_bytes(b"x" * 1000)
    uploader = BackgroundUploader()
    uploader.submit_file(fs, str(local), path, url="s3://some-bucket/runs/a.ckpt", storage_options=options)
    with pytest.raises(UploadError) as info:
        uploader.wait()
    assert info.value.reason == "credentials"
    assert "s3://some-bucket/runs/a.ckpt" in str(info.value)
    assert SECRET not in str(info.value) and "AKIAWRONGKEY00000002" not in str(info.value)
    assert not local.exists()  # the spool file is freed even when the upload fails
    uploader.close()  # the failure was reported by wait(): close stays quiet


def test_no_credentials_found(s3_server, monkeypatch, tmp_path):  # noqa: F811
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError) as info:
        check_writable("s3://bucket-y/runs", {"client_kwargs": {"endpoint_url": s3_server.url}})
    assert info.value.reason == "no_credentials"
    assert "AWS_ACCESS_KEY_ID" in str(info.value) and "s3://bucket-y/runs" in str(info.value)
