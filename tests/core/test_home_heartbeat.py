"""A run on a Ray cluster whose home goes away stops after the grace period; a followed one does not."""
from __future__ import annotations

import time

from gpu_proxy import RayCluster, shipping
from gpu_proxy.runs import RunSpec, values
from gpu_proxy.runs.heartbeat import HomeHeartbeat
from gpu_proxy.runs.job import JobRun


def wait_for_stop(ctx):
    started = time.monotonic()
    while not ctx.should_stop():
        if time.monotonic() - started > 60:
            return "ran out its time"
        time.sleep(0.1)
    return f"stopped after {time.monotonic() - started:.0f} s"


def test_a_run_whose_home_is_gone_stops_after_the_grace_period(ray_head):
    endpoint = RayCluster(ray_head.dashboard_url, token=ray_head.token).endpoint()
    spec = RunSpec(shipping.dumps(wait_for_stop), num_workers=1, home_grace_s=6)
    run = JobRun.submit(endpoint, spec)
    home = HomeHeartbeat(endpoint, spec.name).start()
    time.sleep(3)
    home.close()  # home "dies": no more beats, nobody follows the log
    started = time.monotonic()
    while str(run.status()) not in ("SUCCEEDED", "FAILED", "STOPPED", "JobStatus.SUCCEEDED", "JobStatus.FAILED") and \
            time.monotonic() - started < 60:
        time.sleep(0.5)
    seen: list = []
    outcomes = JobRun(endpoint, run.job_id).follow(seen.append)
    assert values(outcomes[:1])[0].startswith("stopped after")
    # Why it ended is an event (attach and logs show it) and a state `gpu-proxy runs` shows.
    stopped = [event.data["reason"] for event in seen if event.kind == "stopped"]
    assert stopped == ["no heartbeat from home for 6 s"]
    from gpu_proxy.runs.attach import list_runs

    (info,) = [r for r in list_runs(RayCluster(ray_head.dashboard_url, token=ray_head.token)) if r.run_id == run.job_id]
    assert info.status == "STOPPED (no heartbeat from home for 6 s)"


def test_a_followed_run_is_not_stopped(ray_head):
    def short(ctx):
        time.sleep(8)
        return "stopped" if ctx.should_stop() else "finished"

    endpoint = RayCluster(ray_head.dashboard_url, token=ray_head.token).endpoint()
    run = JobRun.submit(endpoint, RunSpec(shipping.dumps(short), num_workers=1, home_grace_s=6))
    outcomes = run.follow(lambda event: None)  # follow() beats while it follows
    assert values(outcomes[:1])[0] == "finished"
