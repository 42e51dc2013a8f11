"""Clusters: where runs execute. See :mod:`gpu_proxy.clusters.base` for the interface."""
from gpu_proxy.clusters.base import Cluster, Endpoint

__all__ = ["Cluster", "Endpoint"]
