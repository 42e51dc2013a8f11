"""The data plane: packages, transfers cut short, staging clean-up, the Jobs API's limit, real sizes.

One large case per path: the embedded cluster here (~1 GB), a cluster given by address with
staging on a real S3 endpoint here (~1 GB model and ~500 MB of data), an SSH cluster in
tests/lightning/test_lightning_on_ssh_cluster.py. The size is in each case's fit (the model out, its
weights home); its validate and predict send an 8 MB model the same way.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
import torch

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy import shipping
from gpu_proxy.dataplane.base import SharedFolder
from gpu_proxy.dataplane.package import Package, PackageError, StoredFile, read_file, write_file
from gpu_proxy.errors import ConfigurationError
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project import big_models
from tests.support.moto_s3 import s3_bucket, s3_server  # noqa: F401
from tests.support.sshd import sshd_missing_reason


def test_a_package_keeps_tied_weights_dtypes_and_writable_arrays(tmp_path):
    import numpy as np

    embedding = torch.nn.Embedding(5, 4)
    head = torch.nn.Linear(4, 5, bias=False)
    head.weight = embedding.weight
    obj = {"embedding": embedding, "head": head, "bf16": torch.randn(7, dtype=torch.bfloat16),
           "array": np.arange(10.0), "view": embedding.weight.detach()[1:]}
    package = shipping.pack(obj)
    assert len(package.buffers) == 3  # one storage for the tied weight and its view, bf16, the array
    back = read_file(str(tmp_path / "p"), write_file(package, str(tmp_path / "p"))).loads()
    assert back["head"].weight is back["embedding"].weight
    assert back["view"].untyped_storage().data_ptr() == back["embedding"].weight.untyped_storage().data_ptr()
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], obj["bf16"])
    back["array"] += 1  # writable, and the write stays in this process (copy-on-write)
    assert read_file(str(tmp_path / "p"), write_file(package, str(tmp_path / "p"))).loads()["array"][0] == 0
    assert Package.from_bytes(package.to_bytes()).loads()["bf16"].equal(obj["bf16"])


def test_a_truncated_or_altered_file_is_never_used(tmp_path):
    path = str(tmp_path / "payload")
    stored = write_file(shipping.pack(torch.randn(100_000)), path)
    with open(path, "r+b") as file:
        file.seek(stored.size // 2)
        file.write(b"\xff" * 8)
    with pytest.raises(PackageError, match="SHA-256"):
        read_file(path, stored)
    os.truncate(path, stored.size // 2)
    with pytest.raises(PackageError, match="cut short"):
        read_file(path, stored)


def test_a_lone_readers_result_refers_to_the_weights_it_wrote_into_the_payload(tmp_path):
    """Package invariants 3-5: the in-place reader's writes reach the file, its result leaves them
    there as spans, home's copy-on-write reading does not reach the file, and a span file that is
    not the one recorded, or not whole, is refused."""
    from gpu_proxy.dataplane.package import read_file_in_place

    payload_path, result_path = str(tmp_path / "payload"), str(tmp_path / "result-0")
    state = {"weight": torch.randn(250_000), "frozen": torch.randn(1000)}
    payload = write_file(shipping.pack(state), payload_path, hashed=False)
    assert payload.sha256 is None  # read on this machine only: invariant 4
    package, mapped = read_file_in_place(payload_path, payload)
    trained = package.loads()
    del package
    trained["weight"].mul_(-1.0)  # what an optimizer step does to the file's own pages
    trained["optimizer"] = torch.ones(100_000)  # new memory: written into the result
    result = write_file(shipping.pack(trained), result_path, hashed=False, spans_of=mapped)
    assert result.spans_of == "payload" and result.size < 500_000  # the 1 MB weight is not written twice
    home = read_file(result_path, result).loads()
    assert torch.equal(home["weight"], -state["weight"]) and torch.equal(home["frozen"], state["frozen"])
    assert torch.equal(home["optimizer"], trained["optimizer"])
    home["weight"].add_(1.0)  # home's copy-on-write: the payload file keeps rank 0's weights
    assert torch.equal(read_file(result_path, result).loads()["weight"], -state["weight"])

    with pytest.raises(PackageError, match="does not name"):
        read_file(result_path, StoredFile(result.location, result.size, None))
    os.truncate(payload_path, payload.size // 2)
    with pytest.raises(PackageError, match="cut short"):
        read_file(result_path, result)
    unhashed = write_file(shipping.pack(torch.randn(1000)), str(tmp_path / "plain"), hashed=False)
    assert unhashed.spans_of is None and read_file(unhashed.location, unhashed).loads().numel() == 1000


@pytest.mark.skipif(sshd_missing_reason() is not None, reason=str(sshd_missing_reason()))
def test_a_lone_readers_result_comes_home_over_ssh_with_the_spans_it_left_in_the_payload(sshd, tmp_path):
    """The head's sender streams a spanned result and then its spans; home gets rank 0's values bit
    for bit, and a result or payload that is not whole, or a digest that does not match, is refused."""
    from gpu_proxy.dataplane.package import read_file_in_place
    from gpu_proxy.dataplane.ssh import SSHPlane, resolve_root

    target = sshd.target()
    plane = SSHPlane(f"spans-{os.getpid()}-{time.monotonic_ns()}", target, resolve_root(target, str(tmp_path / "runs")))
    state = {"weight": torch.randn(300_001), "bias": torch.randn(1001), "frozen": torch.randn(999)}  # unaligned sizes
    payload = plane.send(shipping.pack(state))
    package, mapped = read_file_in_place(payload.location, payload)  # what the head's lone worker does
    trained = package.loads()
    del package
    trained["weight"].mul_(-1.0)
    trained["bias"].add_(1.0)
    trained["optimizer"] = torch.ones(50_000)
    result = write_file(shipping.pack(trained), f"{plane.folder}/result-0", hashed=False, spans_of=mapped)
    assert result.spans_of == "payload" and result.sha256 is None and result.size < 300_000
    home = plane.fetch(result).loads()
    for name in ("weight", "bias", "frozen", "optimizer"):
        assert torch.equal(home[name], trained[name]), name
    plain = write_file(shipping.pack(torch.arange(100_000)), f"{plane.folder}/result-1", hashed=False)
    assert torch.equal(plane.fetch(plain).loads(), torch.arange(100_000))
    hashed = write_file(shipping.pack(torch.arange(100_000)), f"{plane.folder}/result-2")
    with pytest.raises(PackageError, match="does not have the content"):
        plane.fetch(StoredFile(hashed.location, hashed.size, "0" * 64))
    with pytest.raises(PackageError, match="bytes where"):
        plane.fetch(StoredFile(result.location, result.size + 64, None, "payload"))
    os.truncate(payload.location, payload.size // 2)
    with pytest.raises(PackageError, match="bytes where"):
        plane.fetch(result)
    plane.clean()


@pytest.mark.skipif(sshd_missing_reason() is not None, reason=str(sshd_missing_reason()))
def test_an_ssh_transfer_killed_halfway_leaves_nothing_a_run_would_use(sshd, tmp_path):
    from gpu_proxy.dataplane.ssh import SSHPlane, resolve_root
    from gpu_proxy.ssh.errors import SSHError

    target = sshd.target()
    run = f"cut-run-{os.getpid()}-{time.monotonic_ns()}"  # the head's folder may be in /dev/shm: ours alone
    plane = SSHPlane(run, target, resolve_root(target, str(tmp_path / "runs")))
    package = shipping.pack(torch.randn(256 * 2**20 // 4))  # 256 MB: ~1 s on loopback, time to cut it

    def kill_ssh_soon() -> None:  # the head's writer dies mid-stream, as on a lost connection
        # As soon as it exists (a fixed delay raced a quiet machine's transfer, which can end first).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if subprocess.run(["pkill", "-KILL", "-f", f"python3 -c .*/{run}/payload"], check=False).returncode == 0:
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_ssh_soon)
    killer.start()
    with pytest.raises(SSHError):
        plane.send(package)
    killer.join()
    final = f"{plane.folder}/payload"
    assert not os.path.exists(final)  # only the .part, never under the name a run reads
    with pytest.raises(PackageError):
        SharedFolder(plane.folder).receive(StoredFile(final, package.nbytes, "0" * 64))
    stored = plane.send(package)  # a whole transfer, then the round trip home
    assert SharedFolder(plane.folder).receive(stored) == stored
    assert torch.equal(plane.fetch(stored).loads(), package.loads())
    plane.clean()
    assert not os.path.exists(plane.folder)


def test_a_staged_upload_cut_short_is_refused(s3_bucket, tmp_path):
    from gpu_proxy.dataplane.staging import StagingPlane, StagingTransport

    options = s3_bucket.endpoint.storage_options
    plane = StagingPlane("cut", f"{s3_bucket.url}/staging", options)
    package = shipping.pack(torch.randn(2**20))
    stored = plane.send(package)
    import fsspec

    fs, path = fsspec.core.url_to_fs(stored.location, **options)
    fs.pipe_file(path, fs.cat_file(path)[: stored.size // 2])  # what a cut upload could leave
    with pytest.raises(PackageError, match="incomplete"):
        StagingTransport(plane.run_url, options).receive(stored)
    plane.clean()
    assert not fs.exists(plane.run_url.split("://", 1)[1])


def test_no_staging_is_left_after_success_failure_or_ctrl_c(local_cluster, tmp_path, monkeypatch):
    """The embedded run folder is gone after success, after a failure and after Ctrl-C."""
    import glob
    import tempfile

    from tests.lightning_project.models import DigitsData, DigitsModel

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's run folders land here,
    monkeypatch.setattr("gpu_proxy.dataplane.local.SHARED_MEMORY", str(tmp_path))  # wherever the root

    def fit(model, **options):
        run = big_models.trainer(RemoteStrategy(cluster=local_cluster, num_workers=1), **options)
        run.fit(model, datamodule=DigitsData(limit=64))

    fit(DigitsModel())
    with pytest.raises(ValueError, match="boom"):
        fit(DigitsModel(fail_on_rank=0))
    assert glob.glob(str(tmp_path / "gpu-proxy-*")) == []

    import signal
    import time

    from tests.lightning.test_lightning_live_events import Endless

    def interrupt_soon() -> None:
        deadline = time.monotonic() + 60
        while not glob.glob(str(tmp_path / "gpu-proxy-*/payload")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3)  # the worker is training by now
        signal.raise_signal(signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    threading.Thread(target=interrupt_soon, daemon=True).start()
    try:
        with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C, as in a local run
            fit(Endless(), max_epochs=1000, limit_train_batches=None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert glob.glob(str(tmp_path / "gpu-proxy-*")) == []


def test_a_cluster_by_address_without_staging_refuses_a_large_run_before_submitting(ray_head, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    jobs = JobSubmissionClient(ray_head.dashboard_url, headers={"Authorization": f"Bearer {ray_head.token}"})
    before = len(jobs.list_jobs())
    strategy = RemoteStrategy(cluster=ray_head.dashboard_url, num_workers=1)
    with pytest.raises(ConfigurationError, match=r"(?s)\d+ MiB.*256 MiB.*staging_dir"):
        big_models.trainer(strategy).fit(big_models.BigModel(300), train_dataloaders=big_models.loader())
    assert len(jobs.list_jobs()) == before


@pytest.mark.timeout(600)
def test_a_1gb_model_on_the_embedded_cluster(local_cluster, monkeypatch):
    from gpu_proxy.dataplane.local import LocalFolderPlane

    fetched = []
    original = LocalFolderPlane.fetch
    monkeypatch.setattr(LocalFolderPlane, "fetch", lambda self, result: fetched.append(result) or original(self, result))
    result = big_models.fit_validate_predict(RemoteStrategy(cluster=local_cluster, num_workers=1), 1024,
                                            evaluate_megabytes=8)
    _check(result)
    # The lone worker trained the payload's own pages: the fit's result leaves the 1 GB there.
    assert fetched[0].spans_of == "payload" and fetched[0].size < 8 << 20 and fetched[0].sha256 is None


def test_two_workers_on_one_node_each_train_their_own_copy_of_the_payload(local_cluster):
    """Only a lone worker maps the payload in place: with two, rank 1's writes (+2) would reach rank 0's."""
    model = big_models.BigModel(8)
    run = big_models.trainer(RemoteStrategy(cluster=local_cluster, num_workers=2))
    before = model.bulk.clone()
    run.fit(model, train_dataloaders=big_models.loader())
    assert torch.equal(model.bulk, before.mul(-1.0).add(1.0)), "home's weights must be rank 0's"
    assert big_models.state_digest(model) == next(c for c in run.callbacks if isinstance(c, big_models.StateDigest)).digest


@pytest.mark.timeout(600)
def test_a_1gb_model_and_500mb_of_data_by_address_through_a_staging_url(ray_head, tmp_path, monkeypatch):
    """file:// here (the cluster shares this disk) keeps the suite fast; S3 is the next test, smaller."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    staging = tmp_path / "staging"
    strategy = RemoteStrategy(cluster=ray_head.dashboard_url, num_workers=1, staging_dir=f"file://{staging}")
    _check(big_models.fit_validate_predict(strategy, 1024, data_megabytes=512, evaluate_megabytes=8))
    assert not staging.exists() or list(staging.iterdir()) == []  # each run's staging removed once home had it


def test_a_model_by_address_through_s3_staging(ray_head, s3_bucket, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    staging = f"{s3_bucket.url}/staging"
    strategy = RemoteStrategy(cluster=ray_head.dashboard_url, num_workers=1, staging_dir=staging,
                              storage_options=s3_bucket.endpoint.storage_options)
    _check(big_models.fit_validate_predict(strategy, 16))  # over the inline limit: staged both ways
    import fsspec

    fs, path = fsspec.core.url_to_fs(staging, **s3_bucket.endpoint.storage_options)
    assert not fs.exists(path) or fs.ls(path) == []


def _check(result: dict) -> None:
    assert result["rank0"] is not None and result["rank0"] != result["before"]
    assert result["home"] == result["rank0"], "home's weights must be rank 0's, bit for bit"
    assert "val_loss" in result["validated"][0]
    assert result["predictions"][0].shape == (8, 1)


@pytest.mark.skipif(sshd_missing_reason() is not None, reason=str(sshd_missing_reason()))
def test_results_nobody_attached_to_are_removed_after_the_retention(sshd, tmp_path):
    """The next run's send removes run folders older than RETENTION_DAYS on the head; newer ones stay."""
    from gpu_proxy.dataplane.base import RETENTION_DAYS
    from gpu_proxy.dataplane.ssh import SSHPlane, resolve_root

    root = resolve_root(sshd.target(), str(tmp_path / "runs"))
    old, recent = tmp_path / "runs" / "run-old", tmp_path / "runs" / "run-recent"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "result-0").write_bytes(b"x")
    long_ago = __import__("time").time() - (RETENTION_DAYS + 1) * 86400
    os.utime(old, (long_ago, long_ago))
    # A detached run's folder stays on the head's disk: its results may wait days for attach.
    SSHPlane("run-new", sshd.target(), root, in_memory=False).send(shipping.pack(1))
    assert not old.exists() and recent.exists() and (tmp_path / "runs" / "run-new" / "payload").exists()


def test_a_followed_runs_folder_on_the_head_is_in_private_shared_memory(sshd, tmp_path):
    import pwd
    import stat

    from gpu_proxy.dataplane.ssh import SSHPlane, resolve_root

    plane = SSHPlane("run-shm", sshd.target(), resolve_root(sshd.target(), str(tmp_path / "runs")))
    package = shipping.pack(torch.arange(1000))
    plane.check(package, expected_result_bytes=1000)
    stored = plane.send(package)
    shm = f"/dev/shm/gpu-proxy-{pwd.getpwnam(sshd.user).pw_uid}"
    assert stored.location == f"{shm}/run-shm/payload" and plane.folder == f"{shm}/run-shm"
    assert stat.S_IMODE(os.stat(shm).st_mode) == 0o700 and os.stat(shm).st_uid == pwd.getpwnam(sshd.user).pw_uid
    assert torch.equal(plane.fetch(stored).loads(), package.loads())
    plane.clean()
    assert not os.path.exists(f"{shm}/run-shm")


def test_a_cluster_by_address_refuses_more_workers_than_it_has_before_sending_anything(ray_head, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    from gpu_proxy.errors import ClusterResourceError

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    jobs = JobSubmissionClient(ray_head.dashboard_url, headers={"Authorization": f"Bearer {ray_head.token}"})
    before = len(jobs.list_jobs())
    strategy = RemoteStrategy(cluster=ray_head.dashboard_url, num_workers=8)
    with pytest.raises(ClusterResourceError, match="8 workers"):
        big_models.trainer(strategy).fit(big_models.BigModel(1), train_dataloaders=big_models.loader())
    assert len(jobs.list_jobs()) == before


def test_local_cluster_arguments_are_checked():
    from gpu_proxy.clusters.local import LocalCluster

    with pytest.raises(ConfigurationError, match=r"num_cpus='2'"):
        LocalCluster(num_cpus="2")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="num_gpus=-1"):
        LocalCluster(num_gpus=-1)
