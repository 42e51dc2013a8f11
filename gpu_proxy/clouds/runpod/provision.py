"""The four provisioner functions every cloud implements, for RunPod pods.

``run_instances`` (launch), ``query_instances``, ``wait_instances``, ``terminate_instances``: plain
functions over a :class:`RunPodClient`, no Ray and no SSH here (those are cloud-independent and live
in :mod:`gpu_proxy.clouds.runpod.bring_up` and :mod:`gpu_proxy.clusters.ray_bootstrap`). The same four for an Instant Cluster, whose pods RunPod
creates, reports and deletes as one: ``run_cluster``, ``query_cluster``, ``wait_cluster``,
``delete_clusters``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, Sequence

from gpu_proxy.clouds.runpod.client import (CreateClusterRequest, CreatePodRequest, InstantCluster, Pod, RunPodClient,
                                            RunPodError, RunPodNotFoundError)
from gpu_proxy.errors import GpuProxyError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
FAILED = ("EXITED", "ERROR", "TERMINATED")
FIRST_POLL_S = 0.25


def poll_pauses(poll_s: float) -> Iterator[float]:
    """The pauses between reads of starting pods: from ``FIRST_POLL_S``, doubling up to ``poll_s``. A pod that
    starts at once (a warm machine, a small image) is seen within a second, not after a whole ``poll_s``; a
    slow one costs three more reads."""
    pause = min(FIRST_POLL_S, poll_s)
    while True:
        yield pause
        pause = min(poll_s, pause * 2)


class LaunchError(GpuProxyError):
    """A pod did not come up (it failed, or a wait timed out). What was created has been torn down."""


def run_instances(client: RunPodClient, requests: Sequence[CreatePodRequest],
                  created: Callable[[Pod], None]) -> list[Pod]:
    """Create one pod per request, in order. ``created`` is called with each pod as soon as it exists,
    so the caller can record it for teardown before anything else can fail."""
    pods = []
    for request in requests:
        pod = client.create_pod(request)
        created(pod)
        pods.append(pod)
    return pods


def query_instances(client: RunPodClient, pod_ids: Sequence[str]) -> dict[str, Pod | None]:
    """Each pod by id; None for one that no longer exists."""
    result: dict[str, Pod | None] = {}
    for pod_id in pod_ids:
        try:
            result[pod_id] = client.get_pod(pod_id)
        except RunPodNotFoundError:
            result[pod_id] = None
    return result


def wait_instances(client: RunPodClient, pod_ids: Sequence[str], timeout_s: float, progress: Progress,
                   poll_s: float = 2.0) -> list[Pod]:
    """Wait until every pod is RUNNING with its 22/tcp published; fail fast when one fails."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    pauses = poll_pauses(poll_s)
    while True:
        pods = query_instances(client, pod_ids)
        for pod_id, pod in pods.items():
            if pod is None or pod.status in FAILED:
                raise LaunchError(f"RunPod pod {pod_id} {'disappeared' if pod is None else 'is ' + pod.status} "
                                  f"while starting. Check the image and the pod's logs in the RunPod console.")
            if last.get(pod_id) != pod.status:
                progress(f"pod {pod_id} ({pod.name}): {pod.status}")
                last[pod_id] = pod.status
        if all(pod.status == "RUNNING" and pod.ssh_direct for pod in pods.values()):
            return [pods[pod_id] for pod_id in pod_ids]
        if time.monotonic() > deadline:
            waiting = ", ".join(f"{pod_id} {pod.status}" for pod_id, pod in pods.items())
            raise LaunchError(f"RunPod pods were not RUNNING after {timeout_s:.0f} s ({waiting}). A large image "
                              f"takes minutes to pull the first time: raise launch_timeout_s, or try again.")
        time.sleep(next(pauses))


def terminate_instances(client: RunPodClient, pod_ids: Sequence[str]) -> list[str]:
    """Terminate every pod; returns those that could not be terminated (with why). A pod already gone is fine."""
    return _each(pod_ids, client.terminate_pod, "terminated RunPod pod %s")


def _each(resource_ids: Sequence[str], action: Callable[[str], Any], done: str) -> list[str]:
    """``action(id)`` for every id; '<id>: <error>' for those that failed. No retry loop here: each call is a
    DELETE, which the client's one transport already retries with backoff (:mod:`.transport`)."""
    failures = []
    for resource_id in resource_ids:
        try:
            action(resource_id)
            log.info(done, resource_id)
        except RunPodError as error:
            failures.append(f"{resource_id}: {error}")
    return failures


# ---- Instant Clusters ------------------------------------------------------------------------------------

def run_cluster(client: RunPodClient, request: CreateClusterRequest,
                created: Callable[[InstantCluster], None]) -> InstantCluster:
    """Create the cluster; ``created`` gets it as soon as it exists (record its id for teardown first)."""
    cluster = client.create_cluster(request)
    created(cluster)
    return cluster


def query_cluster(client: RunPodClient, cluster_id: str) -> dict[str, Pod] | None:
    """The cluster's member pods by id, in rank order; None when the cluster no longer exists."""
    try:
        return {pod.id: pod for pod in client.cluster_pods(cluster_id)}
    except RunPodNotFoundError:
        return None


def wait_cluster(client: RunPodClient, cluster_id: str, count: int, timeout_s: float, progress: Progress,
                 poll_s: float = 2.0) -> list[Pod]:
    """Wait until the cluster has ``count`` ranked pods, all RUNNING with 22/tcp published; returns them in
    rank order (rank 0, RunPod's primary, first). Fails fast when the cluster or one of its pods fails."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    pauses = poll_pauses(poll_s)
    while True:
        pods = query_cluster(client, cluster_id)
        if pods is None:
            raise LaunchError(f"RunPod Instant Cluster {cluster_id} disappeared while starting.")
        for pod in pods.values():
            if pod.status in FAILED:
                raise LaunchError(f"RunPod pod {pod.id} (rank {pod.cluster_rank}) of Instant Cluster {cluster_id} is "
                                  f"{pod.status} while starting. Check the image and the pod's logs in the RunPod "
                                  f"console.")
            state = f"{pod.status}" + (f", rank {pod.cluster_rank}" if pod.cluster_rank is not None else "")
            if last.get(pod.id) != state:
                progress(f"cluster {cluster_id}: pod {pod.id}: {state}")
                last[pod.id] = state
        ready = [pod for pod in pods.values()
                 if pod.status == "RUNNING" and pod.ssh_direct and pod.cluster_rank is not None]
        if len(ready) >= count and len(pods) == count:
            return sorted(ready, key=lambda pod: pod.cluster_rank)
        if time.monotonic() > deadline:
            waiting = ", ".join(f"{pod.id} {pod.status}" for pod in pods.values()) or "no pods yet"
            raise LaunchError(f"RunPod Instant Cluster {cluster_id} was not RUNNING after {timeout_s:.0f} s "
                              f"({len(pods)} of {count} pods: {waiting}). A large image takes minutes to pull the "
                              f"first time: raise launch_timeout_s, or try again.")
        time.sleep(next(pauses))


def delete_clusters(client: RunPodClient, cluster_ids: Sequence[str]) -> list[str]:
    """Delete every cluster (RunPod terminates its pods); returns those that could not be deleted (with why)."""
    return _each(cluster_ids, client.delete_cluster, "deleted RunPod Instant Cluster %s")
