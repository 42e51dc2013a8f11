"""Standalone pods: one, or a head and workers with global networking (workers join the head at
``<headPodId>.runpod.internal``, in the head's data centre)."""
from __future__ import annotations

import time

from gpu_proxy.clouds.runpod.client import RunPodClient
from gpu_proxy.clouds.runpod.launch.plan import NodePlan, Progress
from gpu_proxy.clouds.runpod.models import CreatePodRequest, Pod
from gpu_proxy.clouds.runpod.provision import query_instances, run_instances, terminate_instances, wait_instances
from gpu_proxy.clusters.ray_node import DEFAULT_GCS_PORT

INTERNAL_DNS = "{pod_id}.runpod.internal"  # RunPod's private name of a pod with global networking


class PodsLaunch:
    def __init__(self, client: RunPodClient, plan: NodePlan, progress: Progress) -> None:
        self.client = client
        self.plan = plan
        self.progress = progress
        self.pod_ids: list[str] = []
        self.cluster_ids: list[str] = []  # none in this mode
        self.launched_at: float | None = None

    def create(self) -> None:
        plan = self.plan
        several = plan.nodes > 1
        common = dict(image=plan.image, gpu_id=plan.gpu_id, gpu_count=plan.gpus_per_node, ports=("22/tcp",),
                      disk_gb=plan.disk_gb, cloud=plan.cloud, global_networking=several)
        head = CreatePodRequest(name=f"{plan.name}-head", env=plan.node_env("head", plan.ray_ports, 0),
                                data_center_ids=plan.data_centers, **common)
        where = " with global networking" if several else ""
        self.progress(f"creating pod {head.name}: {plan.gpus_per_node} x {plan.gpu_id} "
                      f"({plan.cloud.lower()} cloud{where})")
        (head_pod,) = run_instances(self.client, [head], self._created)
        if not several:
            return
        # Workers go to the head's data centre (global networking spans data centres, but slower) and join
        # the head by its private name, which exists as soon as the head pod does.
        gcs = plan.ray_ports.gcs or DEFAULT_GCS_PORT
        workers = []
        for index in range(1, plan.nodes):
            env = plan.node_env("worker", plan.worker_ray_ports, index)
            env["HEAD_ADDRESS"] = f"{INTERNAL_DNS.format(pod_id=head_pod.id)}:{gcs}"
            workers.append(CreatePodRequest(
                name=f"{plan.name}-worker{index}", env=env,
                data_center_ids=(head_pod.data_center_id,) if head_pod.data_center_id else plan.data_centers,
                **common))
        self.progress(f"creating {len(workers)} worker pod(s) joining {env['HEAD_ADDRESS']}")
        run_instances(self.client, workers, self._created)

    def _created(self, pod: Pod) -> None:
        self.pod_ids.append(pod.id)
        if self.launched_at is None:
            self.launched_at = time.time()
        self.progress(f"pod {pod.id} created ({pod.status}, ${pod.cost_per_hour:.2f}/hour)")

    def wait(self, timeout_s: float) -> list[Pod]:
        return wait_instances(self.client, self.pod_ids, timeout_s, self.progress)

    def query(self) -> dict[str, Pod | None]:
        return query_instances(self.client, self.pod_ids)

    def teardown(self, quiet: bool = False) -> list[str]:
        """``quiet``: as the finalizer at interpreter exit, which says nothing."""
        failures = terminate_instances(self.client, list(self.pod_ids))
        failed = {failure.split(":")[0] for failure in failures}
        ended = [pod_id for pod_id in self.pod_ids if pod_id not in failed]
        self.pod_ids[:] = [pod_id for pod_id in self.pod_ids if pod_id in failed]
        if ended and not quiet:
            self.progress(f"terminated pod(s) {', '.join(ended)}")
        return failures
