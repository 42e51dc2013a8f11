"""RunPod: Ray clusters on RunPod GPU pods, through RunPod's REST API v2. See docs/runpod.md."""
from gpu_proxy.clouds.runpod.gpu_types import CostEstimate, estimate_cost, resolve_gpu
from gpu_proxy.clouds.runpod.client import (BillingRecord, BillingReport, CreateClusterRequest, CreatePodRequest,
                                            DataCenter, GpuType, InstantCluster, Pod, RunPodAuthError,
                                            RunPodCapacityError, RunPodClient, RunPodError, RunPodNotFoundError,
                                            RunPodRateLimitError, RunPodUnavailableError, SpendSummary, load_api_key)
from gpu_proxy.clouds.runpod.cluster import RunPodCluster
from gpu_proxy.clouds.runpod.provision import LaunchError

__all__ = ["BillingRecord", "BillingReport", "CostEstimate", "CreateClusterRequest", "CreatePodRequest", "DataCenter",
           "GpuType", "InstantCluster", "LaunchError", "Pod", "RunPodAuthError",
           "RunPodCapacityError", "RunPodClient", "RunPodCluster", "RunPodError", "RunPodNotFoundError",
           "RunPodRateLimitError", "RunPodUnavailableError", "SpendSummary", "estimate_cost", "load_api_key", "resolve_gpu"]
