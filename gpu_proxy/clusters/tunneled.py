"""An existing Ray cluster whose head you reach over SSH (``ray up`` on AWS/GCP/Azure, a lab machine).

The dashboard stays bound to the head's loopback; this object tunnels a local port to it and talks
to the Jobs API through the tunnel with the cluster's token.
"""
from __future__ import annotations

from gpu_proxy.clusters.base import Endpoint, SSHReachedCluster
from gpu_proxy.clusters.ray_cluster import RayCluster
from gpu_proxy.clusters.ray_token import find_ray_token
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.ssh import SSHTarget, SSHTunnel


class TunneledRayCluster(SSHReachedCluster):
    """Args: ``head`` ``"user@host[:port]"``; ``dashboard_port`` on the head (8265); ``token`` (default: the
    usual Ray sources here); ``identity_file``/``known_hosts_file``/``host_key_policy`` as for SSH."""

    def __init__(self, head: str, dashboard_port: int = 8265, token: str | None = None, *,
                 identity_file: str | None = None, known_hosts_file: str | None = None,
                 host_key_policy: str = "accept-new") -> None:
        self.target = SSHTarget.parse(head, identity_file=identity_file, known_hosts_file=known_hosts_file,
                                      host_key_policy=host_key_policy)
        self.dashboard_port = dashboard_port
        self._token = token
        self._tunnel: SSHTunnel | None = None

    def __repr__(self) -> str:
        return f"TunneledRayCluster({self.target.destination!r}, dashboard_port={self.dashboard_port})"

    def __reduce__(self):
        raise TypeError("a TunneledRayCluster holds a token and an SSH process; it cannot be pickled.")

    def start(self) -> None:
        if self._tunnel is not None and self._tunnel.is_open:
            return
        self._tunnel = SSHTunnel(self.target, self.dashboard_port).open()
        self._ray().start()  # the dashboard answers, and accepts the token

    def _ray(self) -> RayCluster:
        if self._tunnel is None:
            raise GpuProxyError(f"{self!r} is not started: call start() first.")
        return RayCluster(f"http://{self._tunnel.local_address}", token=self._token or find_ray_token())

    def endpoint(self) -> Endpoint:
        return self._ray().endpoint()

    def ssh_head(self) -> SSHTarget:
        return self.target

    def resources(self) -> dict[str, float]:
        return self._ray().resources()

    def stop(self) -> None:
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None
