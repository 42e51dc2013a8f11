"""How RunPod pods come to exist, one object per launch mode, each with create / wait / query /
teardown: :class:`PodsLaunch` (one pod, or a head and workers with global networking) and
:class:`InstantClusterLaunch` (one ``POST /v2/clusters``). What every node is told: :class:`NodePlan`.
No SSH and no Ray here: those are :mod:`gpu_proxy.clouds.runpod.cluster`'s."""
from gpu_proxy.clouds.runpod.launch.instant_cluster import InstantClusterLaunch
from gpu_proxy.clouds.runpod.launch.plan import Launch, NodePlan
from gpu_proxy.clouds.runpod.launch.pods import PodsLaunch

__all__ = ["InstantClusterLaunch", "Launch", "NodePlan", "PodsLaunch"]
