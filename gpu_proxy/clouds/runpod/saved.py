"""A RunPod cluster that ``gpu-proxy up runpod`` launched and saved, opened again by name.

The saved definition holds pod ids (and an Instant Cluster's id), the cluster's own SSH key and
known_hosts (0600/0700, under the config folder) and the path of the Ray token file (0600); nothing
secret is in the definition itself. ``start()`` reads the pods from RunPod by id (through the
Instant Cluster, if any; their SSH port can change), re-opens the
tunnel to the head with the saved key, and meters the cost as :class:`RunPodCluster` does (cost
events, budget stop) and beats the home heartbeat while this process holds it. ``stop()`` only
closes what this process opened; ``terminate()`` (``gpu-proxy down``) ends the pods (an Instant
Cluster is deleted as a whole: RunPod refuses to terminate its pods one by one).
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from gpu_proxy.clouds.runpod.client import Pod, RunPodClient
from gpu_proxy.clouds.runpod.meter import CostMeter
from gpu_proxy.clouds.runpod.provision import (LaunchError, delete_clusters, query_cluster, query_instances,
                                               terminate_instances)
from gpu_proxy.clusters.base import Endpoint, SSHReachedCluster
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.ssh import SSHTarget, SSHTunnel


def _print_progress(message: str) -> None:
    print(f"gpu-proxy runpod: {message}", file=sys.stderr, flush=True)


class SavedRunPodCluster(SSHReachedCluster):
    owns_nodes = True  # `gpu-proxy up runpod` started the pods; `down` terminates them

    def __init__(self, name: str, definition: Mapping[str, Any], token: str,
                 progress: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.definition = dict(definition)
        self.pod_ids: list[str] = list(definition["pod_ids"])
        self.cluster_id: str | None = definition.get("cluster_id")  # an Instant Cluster
        self.budget_usd = definition.get("budget_usd")
        self._token = token
        self._progress = progress or _print_progress
        self._client: RunPodClient | None = None
        self._tunnel: SSHTunnel | None = None
        self._meter: CostMeter | None = None
        self._heartbeat = None
        self.budget_exceeded = False

    def __repr__(self) -> str:
        return f"SavedRunPodCluster({self.name!r}, pods={self.pod_ids})"

    def __reduce__(self):
        raise TypeError("a saved RunPod cluster holds a Ray token, your RunPod API key and an SSH tunnel; "
                        "it cannot be pickled.")

    @property
    def client(self) -> RunPodClient:
        if self._client is None:
            self._client = RunPodClient(base_url=self.definition.get("base_url"))
        return self._client

    def _query(self) -> dict[str, Pod | None]:
        if self.cluster_id is None:
            return query_instances(self.client, self.pod_ids)
        members = query_cluster(self.client, self.cluster_id) or {}
        return {pod_id: members.get(pod_id) for pod_id in self.pod_ids}

    def pods(self) -> list[Pod]:
        """The saved pods as RunPod reports them now (head first); raises when one is gone or not running."""
        found = self._query()
        gone = [pod_id for pod_id, pod in found.items() if pod is None or pod.status != "RUNNING"]
        if gone:
            states = ", ".join(f"{pod_id} {'terminated' if found[pod_id] is None else found[pod_id].status}"
                               for pod_id in gone)
            raise GpuProxyError(f"RunPod cluster {self.name!r} is not running ({states}): its idle timeout or budget "
                                f"may have ended it. `gpu-proxy down {self.name}` forgets it (and terminates what is left).")
        return [found[pod_id] for pod_id in self.pod_ids]

    def start(self) -> None:
        if self._tunnel is not None and self._tunnel.is_open:
            return
        head = self.pods()[0]
        if head.ssh_direct is None:
            raise GpuProxyError(f"RunPod pod {head.id} publishes no SSH port.")
        direct = head.ssh_direct
        target = SSHTarget(direct.host, user=direct.username, port=direct.port,
                           identity_file=self.definition["identity_file"],
                           known_hosts_file=self.definition["known_hosts_file"], host_key_policy="accept-new")
        self._tunnel = SSHTunnel(target, int(self.definition["dashboard_port"])).open()
        launched = self.definition.get("launched_at") or time.time()
        spent = float(self.definition.get("usd_per_hour") or 0.0) * (time.time() - launched) / 3600
        self._meter = CostMeter(self, self._rate, interval_s=float(self.definition.get("meter_interval_s") or 30.0),
                                spent_usd=spent, budget_usd=self.budget_usd, end=self._end_for_budget,
                                progress=self._progress).start()
        if self.definition.get("idle_timeout_s"):
            from gpu_proxy.runs.heartbeat import HomeHeartbeat

            self._heartbeat = HomeHeartbeat(self.endpoint(), f"cluster-{self.definition['name']}").start()

    def _rate(self) -> float:
        return sum(pod.cost_per_hour for pod in self._query().values() if pod is not None and pod.status != "EXITED")

    def cost(self) -> dict[str, float | None]:
        if self._meter is None:
            raise GpuProxyError(f"{self!r} is not started.")
        return {"spent_usd": self._meter.spent_usd(), "usd_per_hour": self._meter.usd_per_hour,
                "budget_usd": self.budget_usd}

    def endpoint(self) -> Endpoint:
        if self.budget_exceeded:
            raise GpuProxyError(f"RunPod cluster {self.name!r} was terminated: it reached budget_usd={self.budget_usd:g}.")
        if self._tunnel is None or not self._tunnel.is_open:
            raise GpuProxyError(f"{self!r} is not started: call start() first.")
        return Endpoint(f"http://{self._tunnel.local_address}", self._token)

    def ssh_head(self) -> SSHTarget:
        self.endpoint()  # raises the explanation when it is not started
        return self._tunnel.target

    def resources(self) -> dict[str, float]:
        from gpu_proxy.clusters.ray_cluster import RayCluster

        endpoint = self.endpoint()
        return RayCluster(endpoint.dashboard_url, token=endpoint.token).resources()

    def stop(self) -> None:
        """Close this process's tunnel, meter and heartbeat; the pods keep running."""
        if self._heartbeat is not None:
            self._heartbeat.close()
            self._heartbeat = None
        if self._meter is not None:
            self._meter.close()
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    def _end_for_budget(self) -> None:
        self.budget_exceeded = True
        self.terminate()

    def terminate(self) -> None:
        """Terminate every saved pod, or delete the Instant Cluster (GPU billing ends), and delete the
        cluster's SSH key folder."""
        self.stop()
        if self.cluster_id:
            failures = delete_clusters(self.client, [self.cluster_id])
        else:
            failures = terminate_instances(self.client, self.pod_ids)
        if failures:
            raise LaunchError("Could not terminate every RunPod pod; terminate them in the RunPod console "
                              "(https://www.runpod.io/console/pods):\n" + "\n".join(failures))
        if self.cluster_id:
            self._progress(f"deleted Instant Cluster {self.cluster_id} (pods {', '.join(self.pod_ids)})")
        else:
            self._progress(f"terminated pod(s) {', '.join(self.pod_ids)}")
        state_dir = self.definition.get("state_dir")
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
        Path(self.definition.get("token_file") or "/nonexistent").unlink(missing_ok=True)
