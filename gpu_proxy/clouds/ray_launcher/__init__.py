"""AWS, GCP and Azure (and machines of your own) through Ray's own cluster launcher. See docs/clusters.md."""
from gpu_proxy.clouds.ray_launcher.cluster import LauncherCluster, SavedLauncherCluster
from gpu_proxy.clouds.ray_launcher.instances import InstanceType, instance_for

__all__ = ["InstanceType", "LauncherCluster", "SavedLauncherCluster", "instance_for"]
