"""A detached run's Ray Job (the Job path): a second stop aborts the run on the cluster too."""
from __future__ import annotations

import threading
import time

import pytest

from gpu_proxy import RayCluster, shipping
from gpu_proxy.runs import RunSpec
from gpu_proxy.runs.control import RunControl, StopRequest
from gpu_proxy.runs.job import JobRun

ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


def ignores_stops(ctx):
    time.sleep(90)  # a step that never reaches a boundary: only an abort ends it
    return "slept"


def test_a_second_stop_aborts_the_job_on_the_cluster(ray_head):
    endpoint = RayCluster(ray_head.dashboard_url, token=ray_head.token).endpoint()
    spec = RunSpec(shipping.dumps(ignores_stops), num_workers=1, worker_pool="job-abort")
    run = JobRun.submit(endpoint, spec)
    started = threading.Event()
    control = RunControl(lambda event: started.set() if event.kind == "run_started" else None, spec.name)
    pressed: list[float] = []

    def press_twice() -> None:
        started.wait(60)
        control.put(StopRequest(None))  # graceful: the step ignores it
        time.sleep(2)
        control.interrupted = True  # as RunControl marks a real Ctrl-C
        pressed.append(time.monotonic())
        control.put(StopRequest(None))

    threading.Thread(target=press_twice, daemon=True).start()
    with pytest.raises(KeyboardInterrupt, match="aborted"):
        run.follow(control)
    while str(run.status()).split(".")[-1] not in ENDED and time.monotonic() - pressed[0] < 60:
        time.sleep(0.5)
    ended_after = time.monotonic() - pressed[0]
    assert str(run.status()).split(".")[-1] in ENDED
    assert ended_after < 30, f"the job ran on {ended_after:.0f} s after the second stop"
