"""A pod ending itself through RunPod's REST v2 API, with the *pod-scoped* ``RUNPOD_API_KEY`` RunPod
injects into every pod (https://docs.runpod.io/runpodctl: it may act on that pod only, so a leaked
copy cannot touch the rest of the account; the user's key never goes to a pod). The calls go through
the project's own :class:`~gpu_proxy.clouds.runpod.client.RunPodClient`, whose one transport
(:mod:`gpu_proxy.http_transport`) retries each call on 429, 5xx and network errors; here with more
retries and longer waits than home's (about two minutes in all), because a pod that fails to end itself
goes on billing. A refusal (4xx) is not retried: it would be refused again.

Ending a pod = ``DELETE /v2/pods/{RUNPOD_POD_ID}``; if RunPod refuses a terminate to that key, ``POST
/v2/pods/{id}/action {"action": "stop"}`` (GPU billing ends either way). ``RUNPOD_REST_URL``
overrides RunPod's address (the tests' fake sets it; RunPod does not).
"""
from __future__ import annotations

import time
from typing import Callable

from gpu_proxy.clouds.runpod.client import DEFAULT_BASE_URL, RunPodClient
from gpu_proxy.clouds.runpod.errors import RunPodAuthError, RunPodError, RunPodNotFoundError

Say = Callable[[str], None]
SELF_END_RETRIES = 8


class PodSelf:
    """This pod, acting on itself with the pod-scoped key (held by the client, in memory only: the
    entrypoint removes it from the environment Ray inherits)."""

    def __init__(self, pod_id: str, api_key: str, base_url: str = DEFAULT_BASE_URL,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.pod_id = pod_id
        self.base_url = base_url.rstrip("/")
        # Waits of 1, 2, 4, 8, 16, 30, 30, 30 s (with jitter) between the attempts of each call.
        self.client = RunPodClient(api_key, base_url=self.base_url, max_retries=SELF_END_RETRIES, sleep=sleep)

    def __repr__(self) -> str:
        return f"PodSelf({self.pod_id!r})"

    def __reduce__(self):
        raise TypeError("a PodSelf holds the pod's RunPod key and cannot be pickled")

    def end(self, say: Say) -> bool:
        """Terminate this pod (stop it if the key may not terminate). True once RunPod accepted."""
        try:
            try:
                self.client.terminate_pod(self.pod_id)  # a pod already gone counts as terminated
                say(f"pod {self.pod_id} terminated itself")
                return True
            except RunPodAuthError:
                self.client.stop_pod(self.pod_id)
                say(f"pod {self.pod_id} stopped itself (the pod's key may not terminate it)")
                return True
        except RunPodError as error:
            say(f"RunPod refused or could not be reached when pod {self.pod_id} tried to end itself: {error}")
            return False


class ClusterMemberSelf:
    """A member of a RunPod Instant Cluster, ending itself: RunPod refuses (409) to terminate or stop a
    member pod through the pod endpoints, so it reads its own pod (``cluster.id``) and deletes the whole
    cluster, with the same pod-scoped key. Whether RunPod lets a pod-scoped key delete its own cluster
    is not documented: if it refuses, the caller stops Ray and says that billing continues."""

    def __init__(self, pod: PodSelf) -> None:
        self.pod = pod

    def __repr__(self) -> str:
        return f"ClusterMemberSelf({self.pod.pod_id!r})"

    def __reduce__(self):
        raise TypeError("a ClusterMemberSelf holds the pod's RunPod key and cannot be pickled")

    def end(self, say: Say) -> bool:
        pod_id, client = self.pod.pod_id, self.pod.client
        try:
            try:
                cluster_id = client.get_pod(pod_id).cluster_id
            except RunPodNotFoundError:
                say(f"pod {pod_id} is already gone")
                return True
            if not cluster_id:
                return self.pod.end(say)  # not a cluster member after all
            try:
                client.delete_cluster(cluster_id)  # one already gone counts as deleted
            except RunPodAuthError as error:
                say(f"RunPod answered {error.status}: this pod's key may not delete its Instant Cluster "
                    f"{cluster_id}")
                return False
            say(f"pod {pod_id} deleted its Instant Cluster {cluster_id}: all its pods end")
            return True
        except RunPodError as error:
            say(f"RunPod refused or could not be reached when pod {pod_id} tried to end its Instant Cluster: "
                f"{error}")
            return False


def pod_self_from_env(env: dict) -> PodSelf | None:
    """This pod's handle, or None when RunPod gave it no pod-scoped key (not on RunPod)."""
    pod_id, key = env.get("RUNPOD_POD_ID", "").strip(), env.get("RUNPOD_API_KEY", "").strip()
    if not pod_id or not key:
        return None
    return PodSelf(pod_id, key, env.get("RUNPOD_REST_URL", "").strip() or DEFAULT_BASE_URL)
