"""The node's main loop: sshd, wait for the Ray token (delivered over SSH), Ray, the idle watch;
stop cleanly on SIGTERM/SIGINT.

Exit status: 2 for bad configuration (with every problem listed), 1 when Ray or sshd fails,
Ray's own status when it exits (a failed start is tried once more first), 0 after SIGTERM/SIGINT
stopped the node cleanly.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping

from gpu_proxy.clouds.runpod.node.config import NodeConfig, read_config
from gpu_proxy.clouds.runpod.node.idle_watch import Activity, IdleWatch
from gpu_proxy.clouds.runpod.node.output import say
from gpu_proxy.clouds.runpod.node.pod_self import ClusterMemberSelf, PodSelf
from gpu_proxy.clouds.runpod.node.runpod_env import private_environment
from gpu_proxy.clouds.runpod.node.sshd import start_sshd
from gpu_proxy.clusters.ray_node import RayNodeError, start_node
from gpu_proxy.errors import ConfigurationError

# ``ray start`` gives up when its raylet has not registered within a fixed 30 s (ray/_private/node.py;
# not configurable), which a loaded machine can miss. An error exit this soon after the start is
# taken for a failed start and tried once more (a node that did start and ended this soon, e.g. a
# worker whose head is gone, fails its second start too and ends); a later exit is reported as it is.
START_RETRY_WINDOW_S = 90.0


class _ShutdownFlag:
    """The node shuts down once ``requested``: set by SIGTERM/SIGINT, or by the idle watch when this pod
    cannot end itself through RunPod (or is not on RunPod). The main loop polls it. (Not a run's stop: that is
    :class:`gpu_proxy.runs.control.StopRequest`.)"""

    def __init__(self) -> None:
        self.requested = False
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number: int, frame: object) -> None:
        self.requested = True


def wait_for_token(path: str, wait_s: float, shutdown: _ShutdownFlag) -> bool:
    """True once the token file exists with private permissions; False if stopped or timed out."""
    token = Path(path)
    if not token.exists():
        say(f"waiting up to {wait_s:.0f} s for the Ray token at {path} (deliver it over SSH, mode 0600)")
    deadline = time.monotonic() + wait_s
    while not (token.is_file() and token.stat().st_size > 0):
        if shutdown.requested or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _end(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()



def _end_self(pod: "PodSelf | ClusterMemberSelf | None", shutdown: "_ShutdownFlag") -> None:
    if pod is None:
        say("idle: not on a RunPod pod (no RUNPOD_POD_ID/RUNPOD_API_KEY); stopping Ray and exiting instead")
        shutdown.requested = True
        return
    if not pod.end(say):
        say("idle: could not end this pod through RunPod's API; stopping Ray (GPU billing continues until "
            "the pod is stopped: stop it in the RunPod console)")
        shutdown.requested = True


def _watch_idle(config: NodeConfig, pod: "PodSelf | ClusterMemberSelf | None",
                shutdown: "_ShutdownFlag") -> IdleWatch | None:
    spec = config.node
    if config.idle_timeout_s is None or spec.role != "head":
        return None
    activity = Activity(f"http://127.0.0.1:{spec.dashboard_port}", spec.gcs_address, spec.token_file)
    return IdleWatch(activity, config.idle_timeout_s, lambda: _end_self(pod, shutdown), say).start()


def main(env: Mapping[str, str] = os.environ) -> int:
    try:
        config = read_config(env)
    except ConfigurationError as error:
        say(f"bad configuration, not starting:\n{error}")
        return 2
    pod = private_environment(env)
    shutdown = _ShutdownFlag()
    sshd = None
    watch = None
    try:
        # Home copies the token here over SSH; the folder must exist and be ours alone.
        Path(config.node.token_file).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if config.sshd:
            sshd = start_sshd(config.sshd)
        if not wait_for_token(config.node.token_file, config.token_wait_s, shutdown):
            if shutdown.requested:
                return 0
            say(f"no Ray token arrived at {config.node.token_file} within {config.token_wait_s:.0f} s; "
                "copy it there (mode 0600) before the wait ends, or raise RAY_TOKEN_WAIT_S.")
            return 1
        spec = config.node
        node = start_node(spec)
        started, retried = time.monotonic(), False
        where = (f"on {spec.node_ip}, GCS {spec.gcs_address}, dashboard 127.0.0.1:{spec.dashboard_port}"
                 if spec.role == "head" else f"on {spec.node_ip}, joining {spec.head_address}")
        say(f"Ray {spec.role} starting {where} (token auth on)")
        watch = _watch_idle(config, pod, shutdown)
    except ConfigurationError as error:
        say(f"bad configuration, not starting:\n  - {error}")
        _end(sshd)
        return 2
    try:
        while True:
            if shutdown.requested:
                say("stopping Ray")
                node.stop()
                return 0
            if not node.alive():
                code = node.process.returncode
                if code > 0 and not retried and time.monotonic() - started < START_RETRY_WINDOW_S:
                    say(f"Ray exited with status {code} while starting (see its output above); "
                        "starting it once more")
                    try:
                        node.stop()  # what its session left running
                        node = start_node(spec)
                    except (ConfigurationError, RayNodeError) as error:
                        say(f"could not start Ray again: {error}")
                        return 1
                    started, retried = time.monotonic(), True
                    continue
                say(f"Ray exited with status {code}")
                if config.idle_timeout_s is not None and spec.role == "worker":
                    # The head is gone (ended itself when idle, or was terminated): so is this node's use.
                    _end_self(pod, shutdown)
                return code or 1
            if sshd is not None and sshd.poll() is not None:
                say(f"sshd exited with status {sshd.returncode}; stopping Ray")
                node.stop()
                return 1
            time.sleep(0.5)
    finally:
        if watch is not None:
            watch.close()
        _end(sshd)
