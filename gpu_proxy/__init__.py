"""gpu-proxy: train on remote GPUs as if they were in your laptop. Framework-free core.

Cluster kinds are loaded on first use (PEP 562 ``__getattr__``): ``import gpu_proxy`` does not import
RunPod's client, serverless, Ray's launcher or the SSH machinery a run on the embedded cluster never needs.
"""
from __future__ import annotations

import importlib
from typing import Any

from gpu_proxy.clusters.base import Cluster, Endpoint
from gpu_proxy.clusters.local import LocalCluster
from gpu_proxy.errors import (ClusterResourceError, ConfigurationError, GpuProxyError, RemoteError,
                              RunStoppedError, ShippingError, WorkerLostError)

__version__ = "0.1.0"

_LAZY = {
    "RayCluster": "gpu_proxy.clusters.ray_cluster",
    "SSHCluster": "gpu_proxy.clusters.ssh",
    "RunPodCluster": "gpu_proxy.clouds.runpod",
    "RunPodServerless": "gpu_proxy.clouds.runpod.serverless",
    "LauncherCluster": "gpu_proxy.clouds.ray_launcher",
    "RemoteGPU": "gpu_proxy.clusters.providers",
    "resolve_cluster": "gpu_proxy.clusters.resolve",
    "attach": "gpu_proxy.runs.attach",
    "list_runs": "gpu_proxy.runs.attach",
    "run_events": "gpu_proxy.runs.attach",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'gpu_proxy' has no attribute {name!r}")


__all__ = ["LauncherCluster", "RayCluster", "RemoteGPU", "RunPodCluster", "RunPodServerless", "SSHCluster",
           "resolve_cluster", "attach", "list_runs", "run_events", "Cluster", "ClusterResourceError",
           "ConfigurationError", "Endpoint", "GpuProxyError", "LocalCluster", "RemoteError", "RunStoppedError",
           "ShippingError", "WorkerLostError"]
