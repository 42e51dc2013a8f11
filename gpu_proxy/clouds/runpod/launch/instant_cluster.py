"""One RunPod Instant Cluster (``POST /v2/clusters``): RunPod makes all the pods at once, rank 0 is the
head, the others join ``$MASTER_ADDR``; it is deleted as a whole (its pods cannot be ended one by one)."""
from __future__ import annotations

import time

from gpu_proxy.clouds.runpod.client import RunPodClient
from gpu_proxy.clouds.runpod.errors import RunPodError, RunPodUnavailableError
from gpu_proxy.clouds.runpod.launch.plan import NodePlan, Progress
from gpu_proxy.clouds.runpod.models import CreateClusterRequest, InstantCluster, Pod
from gpu_proxy.clouds.runpod.provision import delete_clusters, query_cluster, run_cluster, wait_cluster


class InstantClusterLaunch:
    def __init__(self, client: RunPodClient, plan: NodePlan, progress: Progress) -> None:
        self.client = client
        self.plan = plan
        self.progress = progress
        self.pod_ids: list[str] = []  # the members, once placed (rank order)
        self.cluster_ids: list[str] = []  # the cluster's id, once created (a list: the finalizer shares it)
        self.launched_at: float | None = None

    @property
    def cluster_id(self) -> str | None:
        return self.cluster_ids[0] if self.cluster_ids else None

    def create(self) -> None:
        plan = self.plan
        request = CreateClusterRequest(name=plan.name, image=plan.image, gpu_id=plan.gpu_id,
                                       gpus_per_pod=plan.gpus_per_node, pod_count=plan.nodes, env=plan.cluster_env(),
                                       ports=("22/tcp",), disk_gb=plan.disk_gb, data_center_ids=plan.data_centers)
        self.progress(f"creating Instant Cluster {plan.name}: {plan.nodes} pods x {plan.gpus_per_node} x "
                      f"{plan.gpu_id}")
        try:
            run_cluster(self.client, request, self._created)
        except RunPodUnavailableError:
            # Every retry failed, yet one of them may have reached RunPod: find it so the teardown deletes it.
            try:
                found = self.client.find_cluster(plan.name)
            except RunPodError:
                found = None
            if found is not None and found.id not in self.cluster_ids:
                self.cluster_ids.append(found.id)
            raise

    def _created(self, cluster: InstantCluster) -> None:
        self.cluster_ids.append(cluster.id)
        if self.launched_at is None:
            self.launched_at = time.time()
        self.progress(f"Instant Cluster {cluster.id} created ({cluster.pods_total} pod(s)"
                      + (f" in {cluster.data_center_id}" if cluster.data_center_id else "") + ")")

    def wait(self, timeout_s: float) -> list[Pod]:
        pods = wait_cluster(self.client, self.cluster_id, self.plan.nodes, timeout_s, self.progress)
        self.pod_ids[:] = [pod.id for pod in pods]  # rank order: the head (rank 0) first
        return pods

    def query(self) -> dict[str, Pod | None]:
        """Read through the cluster (``/v2/clusters/{id}/pods``): RunPod hides members from ``/v2/pods``."""
        if self.cluster_id is None:
            return {}
        members = query_cluster(self.client, self.cluster_id) or {}
        return {pod_id: members.get(pod_id) for pod_id in self.pod_ids} | members

    def teardown(self, quiet: bool = False) -> list[str]:
        """``quiet``: as the finalizer at interpreter exit, which says nothing."""
        if not self.cluster_ids:
            return []
        ids, clusters = list(self.pod_ids), list(self.cluster_ids)
        failures = delete_clusters(self.client, clusters)
        failed = {failure.split(":")[0] for failure in failures}
        self.cluster_ids[:] = [cluster_id for cluster_id in self.cluster_ids if cluster_id in failed]
        if not self.cluster_ids:
            self.pod_ids.clear()  # RunPod terminated them with their cluster
        for cluster_id in clusters:
            if cluster_id not in self.cluster_ids and not quiet:
                self.progress(f"deleted Instant Cluster {cluster_id} (RunPod terminates its pods"
                              + (f": {', '.join(ids)}" if ids else "") + ")")
        return failures
