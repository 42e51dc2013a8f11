"""gpu-proxy: train on remote GPUs as if they were in your laptop. Framework-free core."""
from gpu_proxy.clusters.base import Cluster, Endpoint
from gpu_proxy.clusters.local import LocalCluster
from gpu_proxy.errors import (ClusterResourceError, ConfigurationError, GpuProxyError, RemoteError,
                              RunStoppedError, ShippingError, WorkerLostError)

from gpu_proxy.clusters.ray_cluster import RayCluster
from gpu_proxy.clusters.ssh import SSHCluster
from gpu_proxy.clouds.runpod import RunPodCluster
from gpu_proxy.clouds.runpod.serverless import RunPodServerless
from gpu_proxy.clouds.ray_launcher import LauncherCluster
from gpu_proxy.clusters.providers import RemoteGPU
from gpu_proxy.clusters.resolve import resolve_cluster
from gpu_proxy.runs.attach import attach, list_runs, run_events

__version__ = "0.1.0"
__all__ = ["LauncherCluster", "RayCluster", "RemoteGPU", "RunPodCluster", "RunPodServerless", "SSHCluster",
           "resolve_cluster", "attach", "list_runs", "run_events", "Cluster", "ClusterResourceError", "ConfigurationError", "Endpoint", "GpuProxyError",
           "LocalCluster", "RemoteError", "RunStoppedError", "ShippingError", "WorkerLostError"]
