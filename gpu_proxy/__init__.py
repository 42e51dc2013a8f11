"""gpu-proxy: train on remote GPUs as if they were in your laptop. Framework-free core."""
from gpu_proxy.clusters.base import Cluster, Endpoint
from gpu_proxy.clusters.local import LocalCluster
from gpu_proxy.errors import (ClusterResourceError, ConfigurationError, GpuProxyError, RemoteError,
                              ShippingError, WorkerLostError)

__version__ = "0.1.0"
__all__ = ["Cluster", "ClusterResourceError", "ConfigurationError", "Endpoint", "GpuProxyError",
           "LocalCluster", "RemoteError", "ShippingError", "WorkerLostError"]
