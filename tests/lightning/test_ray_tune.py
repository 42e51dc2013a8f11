"""Ray Tune on the cluster: trials fit through RemoteStrategy inside their own placement groups (docs/sweeps.md)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from ray.util.placement_group import placement_group_table

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs.pool import borrowed_bundles
from gpu_proxy_lightning.tune import TuneReportCallback, checkpoint_path, trial_resources
from tests import tune_project
from tests.tune_project import BATCHES_PER_EPOCH, CASES, CPUS_PER_WORKER, MAX_EPOCHS, Regressor, loaders


def notes(folder: Path, trial_id: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{trial_id}.jsonl").read_text().splitlines()]


def gpu_proxy_groups() -> set[str]:
    return {pg_id for pg_id, entry in placement_group_table().items() if entry["name"].startswith("gpu-proxy-")}


def val_loss_of(checkpoint: dict) -> float:
    model = Regressor(lr=0.0)
    model.load_state_dict(checkpoint["state_dict"])
    x, y = next(iter(loaders()[1]))
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model.net(x), y).item()


def test_an_asha_sweep_reports_what_the_trials_logged_and_keeps_workers_in_the_trials_groups(local_cluster,
                                                                                             tmp_path):
    groups_before = gpu_proxy_groups()
    started = time.monotonic()
    results = tune_project.tuner(str(tmp_path), str(tmp_path / "storage")).fit()
    print(f"{len(CASES)} trials in {time.monotonic() - started:.1f} s")
    by_case = {r.config["case"]: r for r in results}
    assert sorted(by_case) == list(range(len(CASES)))

    # ASHA stopped the poor trial at its first rung; the failing trial failed alone.
    assert by_case[2].error is None and by_case[2].metrics["training_iteration"] == 1
    assert by_case[3].error is not None and "fails on purpose" in str(by_case[3].error)
    assert by_case[0].error is None and by_case[1].error is None

    for case, result in by_case.items():
        trial_notes = notes(tmp_path, result.metrics["trial_id"])
        # What Tune got per iteration is what the module logged per epoch. (Not for the failing trial: its
        # restored attempt fails before it reports, and Tune's frame of it may then hold no rows.)
        if result.error is None:
            logged = {n["epoch"] + 1: n["val_loss"] for n in trial_notes if n["kind"] == "val"}
            frame = result.metrics_dataframe
            assert frame is not None and "training_iteration" in frame, (case, frame)
            reported = dict(zip(frame["training_iteration"], frame["val_loss"]))
            assert reported and reported == pytest.approx({i: logged[i] for i in reported}, rel=1e-6), case
        # The worker ran inside the trial's own placement group: the trainable's bundle, then the worker's.
        trainables = [n for n in trial_notes if n["kind"] == "trainable"]
        workers = [n for n in trial_notes if n["kind"] == "worker"]
        assert [w["pg"] for w in workers] == [t["pg"] for t in trainables]
        assert all(t["bundles"] == {"0": {"CPU": 0.5}, "1": {"CPU": CPUS_PER_WORKER}} for t in trainables)
    assert gpu_proxy_groups() == groups_before  # no placement group of gpu-proxy's own: Tune's were used

    # The stopped trial's run stopped soon after Tune's decision, long before its end (2 s an epoch).
    assert len([n for n in notes(tmp_path, by_case[2].metrics["trial_id"]) if n["kind"] == "val"]) < MAX_EPOCHS

    # The failed trial was restored once from its epoch-0 checkpoint, then failed again.
    attempts = [n["step"] for n in notes(tmp_path, by_case[3].metrics["trial_id"]) if n["kind"] == "worker"]
    assert attempts == [0, BATCHES_PER_EPOCH]

    # Each checkpoint Tune kept holds the weights of the report beside it.
    best = results.get_best_result()  # the largest rate that does not fail learns fastest: it ran to the end
    assert best.config["case"] == 1 and best.metrics["training_iteration"] == MAX_EPOCHS
    checkpoint = torch.load(checkpoint_path(best.checkpoint), weights_only=False)
    assert checkpoint["epoch"] == MAX_EPOCHS - 1
    assert val_loss_of(checkpoint) == pytest.approx(best.metrics["val_loss"], rel=1e-5)
    # Every trial's group, and with it the workers inside, is gone with its trial (Tune's, never kept warm).
    states = {pg_id: entry["state"] for pg_id, entry in placement_group_table().items()}
    trial_groups = {n["pg"] for r in results for n in notes(tmp_path, r.metrics["trial_id"]) if n["kind"] == "trainable"}
    assert len(trial_groups) == len(CASES) + 1 and {states.get(pg, "REMOVED") for pg in trial_groups} == {"REMOVED"}


def test_workers_take_the_last_bundles_of_the_enclosing_group():
    worker = {"CPU": 1.0}
    assert borrowed_bundles(2, worker, [{"CPU": 1.0}, worker, worker], holds_first=True) == [1, 2]
    # A trainable of no resources (Tune's empty head bundle) shares the first bundle with a worker.
    assert borrowed_bundles(2, worker, [worker, worker], holds_first=False) == [0, 1]
    with pytest.raises(ConfigurationError, match="num_workers=3"):  # never in the trainable's own bundle
        borrowed_bundles(3, worker, [{"CPU": 1.0}, worker, worker], holds_first=True)
    with pytest.raises(ConfigurationError, match="trial_resources"):
        borrowed_bundles(1, {"CPU": 1.0, "GPU": 1.0}, [{"CPU": 1.0}, worker], holds_first=True)


def test_trial_resources_and_the_callback_refuse_bad_values_early():
    factory = trial_resources(num_workers=2, cpus_per_worker=2, gpus_per_worker=1, trainable_cpus=0)
    assert factory.bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2 and factory.head_bundle_is_empty
    with pytest.raises(ConfigurationError, match="num_workers=0"):
        trial_resources(num_workers=0)
    with pytest.raises(ConfigurationError, match="must reserve something"):
        trial_resources(cpus_per_worker=0)
    with pytest.raises(ConfigurationError, match="on='epoch'"):
        TuneReportCallback(on="epoch")
    with pytest.raises(ConfigurationError, match="metrics=3"):
        TuneReportCallback(metrics=3)


def test_a_checkpoint_on_an_fsspec_url_is_named_as_the_workers_open_it(tmp_path):
    from gpu_proxy_lightning.tune import _staged_checkpoint

    (tmp_path / "staged").mkdir()
    checkpoint = _staged_checkpoint(f"file://{tmp_path}/staged")
    assert checkpoint_path(checkpoint) == f"file://{tmp_path}/staged/checkpoint.ckpt"
    local = _staged_checkpoint(str(tmp_path / "staged"))
    assert checkpoint_path(local, "model.ckpt") == f"{tmp_path}/staged/model.ckpt"


@pytest.mark.timeout(400)
def test_a_sweep_submitted_as_a_ray_job_to_a_cluster_by_address_runs_its_trials_there(ray_head, tmp_path):
    """docs/sweeps.md's remote recipe: the driver is a Ray Job on the cluster; its trials fit through
    RemoteStrategy on that cluster, inside their own placement groups, even with warm gpu-proxy
    workers of earlier fits idle there (trial_resources asks them to yield)."""
    import sys

    from ray.job_submission import JobStatus, JobSubmissionClient

    from gpu_proxy import shipping
    from gpu_proxy.clusters.ray_cluster import RayCluster
    from gpu_proxy.runs import RunSpec, execute, values

    cluster = RayCluster(ray_head.dashboard_url, token=ray_head.token)
    values(execute(cluster, RunSpec(shipping.dumps(lambda ctx: 1), num_workers=2), lambda event: None))  # 2 CPUs held warm
    root = Path(__file__).resolve().parents[2]
    jobs = JobSubmissionClient(ray_head.dashboard_url, headers={"Authorization": f"Bearer {ray_head.token}"})
    job = jobs.submit_job(entrypoint=f"cd {root} && {sys.executable} -m tests.tune_project {tmp_path} {tmp_path / 'storage'}",
                          runtime_env={"env_vars": {"PYTHONPATH": str(root)}})
    deadline = time.monotonic() + 360
    while jobs.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, jobs.get_job_logs(job)[-3000:]
        time.sleep(1)
    logs = jobs.get_job_logs(job)
    assert jobs.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    (summary,) = [json.loads(line) for line in logs.splitlines() if line.startswith('{"trials"')]
    assert len(summary["trials"]) == 2 and not any(t["error"] for t in summary["trials"])
    for trial in summary["trials"]:
        trial_notes = notes(tmp_path, trial["trial_id"])
        # What Tune got last is what the module logged in that epoch (ASHA may stop a trial a few
        # batches after its last report, so later epochs can have logged more).
        logged = {n["epoch"] + 1: n["val_loss"] for n in trial_notes if n["kind"] == "val"}
        assert trial["val_loss"] == pytest.approx(logged[trial["iteration"]], rel=1e-6)
        [trainable] = [n for n in trial_notes if n["kind"] == "trainable"]
        assert [n["pg"] for n in trial_notes if n["kind"] == "worker"] == [trainable["pg"]]
