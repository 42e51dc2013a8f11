"""Ray Tune on a metered cluster: home's meter publishes its reading to the cluster, trials report
their share, and the budget stops the sweep (gpu_proxy/tune_cost.py, docs/sweeps.md)."""
from __future__ import annotations

import filecmp
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from gpu_proxy.clouds.runpod.meter import CostMeter
from gpu_proxy.runs.cluster_kv import METER, kv_key
from gpu_proxy.tune_cost import BudgetStopper, MeterFollower, TrialCost, parse_reading, trial_share
from tests.sweep_project import BATCHES_PER_EPOCH


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reading(usd_per_hour: float, spent_usd: float = 0.0, budget_reached: bool = False) -> bytes:
    return json.dumps({"spent_usd": spent_usd, "usd_per_hour": usd_per_hour, "budget_usd": 10.0,
                       "budget_reached": budget_reached}).encode()


def test_a_trial_pays_its_share_of_the_priced_resource():
    assert trial_share([{"CPU": 1.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}], {"CPU": 32.0, "GPU": 8.0}) == 0.25
    assert trial_share([{"CPU": 1.0}], {"CPU": 32.0, "GPU": 8.0}) == 0.0  # a GPU cloud bills its GPUs
    assert trial_share([{"CPU": 0.5}, {"CPU": 0.5}], {"CPU": 4.0}) == 0.25  # no GPU: the CPUs are priced
    assert trial_share([{"CPU": 8.0}], {"CPU": 4.0}) == 1.0 and trial_share([{"CPU": 1.0}], {}) == 0.0


def test_no_reading_is_no_cost_and_a_reading_prices_the_time_from_then():
    clock, value = Clock(), [None]
    follower = MeterFollower(read=lambda: value[0], clock=clock)
    follower.poll()
    cost = TrialCost(follower, share=0.5)
    clock.now += 3600
    follower.poll()
    assert cost.cost_usd() is None and cost.fields() == {}  # unmetered: no price, not $0
    assert parse_reading(b"") is None and parse_reading(b"not json") is None and parse_reading(b"[1]") is None

    value[0] = reading(usd_per_hour=2.0, spent_usd=7.0)
    follower.poll()
    clock.now += 1800  # half an hour at $2/h, half of it the trial's
    assert cost.cost_usd() == pytest.approx(0.5)
    assert cost.fields() == {"cost_usd": pytest.approx(0.5), "cluster_spent_usd": pytest.approx(8.0)}
    value[0] = reading(usd_per_hour=4.0, spent_usd=8.0)  # the pods' rate changed
    follower.poll()
    clock.now += 900
    assert cost.cost_usd() == pytest.approx(0.5 + 0.5 * 4.0 / 4)
    later = TrialCost(follower, share=1.0)  # a trial that starts later pays from its start
    clock.now += 900
    assert later.cost_usd() == pytest.approx(1.0) and not later.budget_reached


def test_the_budget_stops_this_processs_runs_once_and_the_stopper_waits_for_running_trials(monkeypatch):
    from gpu_proxy.clusters import base
    from gpu_proxy.runs.control import RunControl

    control = RunControl(lambda event: None, "trial-run")
    monkeypatch.setattr(base, "all_active_runs", lambda: [control])
    value = [reading(1.0)]
    follower = MeterFollower(read=lambda: value[0])
    follower.poll()
    assert control.stop_reason is None
    value[0] = reading(1.0, spent_usd=9.5, budget_reached=True)
    follower.poll()
    follower.poll()
    assert "budget_usd=10 is reached" in control.stop_reason and follower.stopped_for_budget(control)
    assert control._queue.qsize() == 1  # asked once

    stopper = BudgetStopper(read=lambda: value[0], poll_s=0.0, wait_s=60)
    trial, late = (type("Trial", (), {"trial_id": name, "status": "RUNNING"})() for name in "ab")
    stopper.on_step_end(0, [trial])
    assert not stopper.stop_all()  # the running trial's run is stopping at its next step
    assert not stopper("a", {"val_loss": 1.0})
    stopper.on_step_end(1, [trial, late])  # Tune started another meanwhile: not waited for
    assert not stopper.stop_all()
    assert stopper("a", {"val_loss": 1.0, "budget_reached": True})  # its last report ends it
    trial.status = "TERMINATED"
    stopper.on_step_end(2, [trial, late])
    assert stopper.stop_all()
    alone = BudgetStopper(read=lambda: value[0], poll_s=0.0, wait_s=0.0)  # given as stop= only: waits wait_s
    assert alone.stop_all()
    assert not BudgetStopper(read=lambda: None).stop_all() and not BudgetStopper(read=lambda: reading(1.0)).stop_all()


@pytest.mark.timeout(120)
def test_the_meter_publishes_its_reading_through_the_jobs_api_and_waits_for_the_clusters_jobs(ray_head):
    """A real CostMeter on a loopback `ray start --head`: its reading reaches a Ray Job there, the
    budget's reading first, and the pods end only once that Job (a sweep's driver) has ended."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from gpu_proxy.clusters.ray_cluster import RayCluster

    root = Path(__file__).resolve().parents[2]
    jobs = JobSubmissionClient(ray_head.dashboard_url, headers={"Authorization": f"Bearer {ray_head.token}"})
    reader = ("import json, time, ray; ray.init(); from gpu_proxy.tune_cost import read_meter, parse_reading\n"
              "seen = []\n"
              "while not (seen and seen[-1].get('budget_reached')):\n"
              "    r = parse_reading(read_meter())\n"
              "    if r and (not seen or r != seen[-1]): seen.append(r)\n"
              "    time.sleep(0.05)\n"
              "time.sleep(1.0)  # the trials' runs stopping\n"
              "print('READINGS ' + json.dumps(seen), flush=True)\n")
    job = jobs.submit_job(entrypoint=f"{sys.executable} -c \"{reader}\"",
                          runtime_env={"env_vars": {"PYTHONPATH": str(root)}})
    while jobs.get_job_status(job) == JobStatus.PENDING:
        time.sleep(0.1)
    ended = []
    cluster = RayCluster(ray_head.dashboard_url, token=ray_head.token)
    rate = [0.0]  # $0/h until the reader runs, then $3600/h: $1 a second
    meter = CostMeter(cluster, lambda: rate[0], interval_s=0.2, budget_usd=2.0, checkpoint_margin_s=0.0, grace_s=30,
                      end=lambda: ended.append(jobs.get_job_status(job))).start()
    try:
        time.sleep(1.0)
        rate[0] = 3600.0
        deadline = time.monotonic() + 60
        while not ended:
            assert time.monotonic() < deadline, jobs.get_job_logs(job)[-2000:]
            time.sleep(0.1)
    finally:
        meter.close()
    assert ended == [JobStatus.SUCCEEDED]  # the grace lasted while the cluster's own Job ran
    logs = jobs.get_job_logs(job)
    [line] = [line for line in logs.splitlines() if line.startswith("READINGS ")]
    seen = json.loads(line[len("READINGS "):])
    assert seen[0]["budget_reached"] is False and seen[0]["budget_usd"] == 2.0
    assert seen[-1]["budget_reached"] is True and 1.5 <= seen[-1]["spent_usd"] <= 2.0
    assert [r["spent_usd"] for r in seen] == sorted(r["spent_usd"] for r in seen)


@pytest.mark.timeout(180)
def test_a_tune_sweep_reports_each_trials_cost_and_the_budget_stops_it_with_checkpoints(local_cluster, tmp_path):
    """Home's meter (RunPod's CostMeter at a rate the test sets) publishes into the embedded cluster's
    store (the Jobs API hop is the test above); two trials of three run at once, and the budget is
    reached while both run: both stop at a step with a checkpoint, and the third never starts."""
    import ray
    from ray.experimental import internal_kv

    from gpu_proxy_lightning.tune import checkpoint_path
    from tests.lightning import tune_cost_project

    folder = tmp_path / "notes"
    folder.mkdir()

    def trials_training() -> int:  # trials that have logged an epoch
        return sum(1 for f in folder.glob("*.jsonl") if '"val"' in f.read_text())

    rate_usd_per_hour = 36.0  # $0.01 a second, while both trials train
    key = kv_key(*METER)
    meter = CostMeter(local_cluster, lambda: rate_usd_per_hour if trials_training() >= 2 else 0.0, interval_s=0.2,
                      budget_usd=0.02, checkpoint_margin_s=0.0, grace_s=30,
                      publish=lambda value: internal_kv._internal_kv_put(key, value))
    meter.start()
    try:
        started = time.monotonic()
        results = tune_cost_project.tuner(str(folder), str(tmp_path / "storage")).fit()
        print(f"sweep in {time.monotonic() - started:.1f} s, meter {meter.spent_usd():.4f} USD")
    finally:
        meter.close()
        internal_kv._internal_kv_del(key)  # the session's later sweeps run on an unmetered cluster
    assert meter.budget_reached
    ran = [r for r in results if r.metrics.get("training_iteration")]
    assert len(ran) == 2 and len(list(folder.glob("*.jsonl"))) == 2  # the third trial never started
    share = trial_share([{"CPU": 0.5}, {"CPU": 0.5}], ray.cluster_resources())
    for result in ran:
        assert result.error is None, result.error  # ended by the stopper, not failed
        frame = result.metrics_dataframe
        costs, spent = list(frame["cost_usd"]), list(frame["cluster_spent_usd"])
        assert costs == sorted(costs) and costs[-1] > 0
        # The trial's share of the cluster's spend (both ran through all of it), within one meter tick
        # and one poll of the reading: the clocks of home and of the trainable differ by that much.
        assert costs[-1] == pytest.approx(share * spent[-1], abs=share * rate_usd_per_hour * 1.0 / 3600)
        assert spent[-1] >= 0.015  # the budget's reading (0.02 minus a tick), then priced until the trial stopped
        last = result.metrics
        assert last["budget_reached"] is True and last["training_iteration"] < tune_cost_project.MAX_EPOCHS + 1
        # Its last checkpoint is the step where the budget stopped its run: the interrupted.ckpt saved then.
        saved = torch.load(checkpoint_path(result.checkpoint), weights_only=False)
        assert saved["global_step"] >= (last["training_iteration"] - 1) * BATCHES_PER_EPOCH  # after its last epoch report
        assert filecmp.cmp(checkpoint_path(result.checkpoint), folder / last["trial_id"] / "interrupted.ckpt",
                           shallow=False)
        epochs = [json.loads(line) for line in (folder / f"{last['trial_id']}.jsonl").read_text().splitlines()
                  if '"val"' in line]
        assert len(epochs) < tune_cost_project.MAX_EPOCHS  # stopped mid-run
