"""Turn what the user passed as ``cluster=`` into a :class:`Cluster`."""
from __future__ import annotations

from typing import Union

from gpu_proxy.clusters.base import Cluster
from gpu_proxy.errors import ConfigurationError

ClusterSpec = Union[Cluster, str, None]


def resolve_cluster(spec: ClusterSpec) -> Cluster:
    """``None``: the embedded local cluster; a Cluster: itself; ``http(s)://``: an existing Ray cluster."""
    if spec is None:
        from gpu_proxy.clusters.local import default_local_cluster

        return default_local_cluster()
    if isinstance(spec, Cluster):
        return spec
    if isinstance(spec, str):
        if spec.startswith("ray://"):
            raise ConfigurationError(
                f"cluster={spec!r}: gpu-proxy does not use Ray Client (ray://), which Ray no longer "
                "maintains. Pass the cluster's dashboard address instead, e.g. "
                f"cluster='http://{spec[len('ray://'):].split(':')[0]}:8265' (through an SSH tunnel if it "
                "is remote: gpu_proxy.SSHCluster does that for you).")
        if spec.startswith(("http://", "https://")):
            from gpu_proxy.clusters.ray_cluster import RayCluster

            return RayCluster(spec)
        if spec in ("local", "embedded"):
            from gpu_proxy.clusters.local import default_local_cluster

            return default_local_cluster()
        from gpu_proxy.clusters.saved import load_saved_cluster

        return load_saved_cluster(spec)
    raise ConfigurationError(
        f"cluster={spec!r} is a {type(spec).__name__}; pass None (embedded local cluster), a "
        "gpu_proxy Cluster object, a dashboard address 'http://host:8265', or a saved cluster name.")
