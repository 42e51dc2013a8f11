"""RunPod: Ray clusters on RunPod GPU pods, through RunPod's REST API v2. See docs/runpod.md."""
from gpu_proxy.clouds.runpod.catalog import CostEstimate, estimate_cost, resolve_gpu
from gpu_proxy.clouds.runpod.client import (CreatePodRequest, DataCenter, GpuType, Pod, RunPodAuthError,
                                            RunPodCapacityError, RunPodClient, RunPodError, RunPodNotFoundError,
                                            RunPodRateLimitError, RunPodUnavailableError, load_api_key)
from gpu_proxy.clouds.runpod.cluster import RunPodCluster
from gpu_proxy.clouds.runpod.provision import LaunchError

__all__ = ["CostEstimate", "CreatePodRequest", "DataCenter", "GpuType", "LaunchError", "Pod", "RunPodAuthError",
           "RunPodCapacityError", "RunPodClient", "RunPodCluster", "RunPodError", "RunPodNotFoundError",
           "RunPodRateLimitError", "RunPodUnavailableError", "estimate_cost", "load_api_key", "resolve_gpu"]
