"""Clusters: where runs execute. See :mod:`gpu_proxy.clusters.base` for the interface."""
from gpu_proxy.clusters.base import Cluster, Endpoint
from gpu_proxy.clusters.local import LocalCluster
from gpu_proxy.clusters.ray_cluster import RayCluster
from gpu_proxy.clusters.ssh import SSHCluster

__all__ = ["Cluster", "Endpoint", "LocalCluster", "RayCluster", "SSHCluster"]
