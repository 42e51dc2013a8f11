"""What a started :class:`RunPodCluster` holds (its launch, pods, tunnel, token, key folder) and how it lets
go of it: detached (the pods keep running, as after ``gpu-proxy up``) or ended (every pod terminated)."""
from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from gpu_proxy.clouds.runpod.launch import Launch
from gpu_proxy.clouds.runpod.models import Pod
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.ssh import SSHTarget

if TYPE_CHECKING:
    import weakref

    from gpu_proxy.ssh import SSHTunnel


def _teardown(launch: Launch | None, tunnel_box: list, folder: str | None, quiet: bool = False) -> list[str]:
    """Close the tunnel, end what the launch made, delete the key folder once nothing is left. Never
    references the cluster object (it also runs as a finalizer at interpreter exit)."""
    for tunnel in tunnel_box:
        tunnel.close()
    tunnel_box.clear()
    failures = launch.teardown(quiet=quiet) if launch is not None else []
    if folder and (launch is None or (not launch.pod_ids and not launch.cluster_ids)):
        shutil.rmtree(folder, ignore_errors=True)
    return failures


class HeldPods:
    """Mixed into :class:`RunPodCluster`: its launch state, read and let go of (with the cluster's
    ``_ssh_target`` and :class:`~.cost_state.CostState`'s ``_unwatch``)."""

    _launch: Launch | None
    _pods: list[Pod]
    _tunnel_box: "list[SSHTunnel]"
    _token: str | None
    _folder: str | None
    _finalizer: "weakref.finalize | None"

    @property
    def _pod_ids(self) -> list[str]:
        return self._launch.pod_ids if self._launch is not None else []

    @property
    def _cluster_ids(self) -> list[str]:
        return self._launch.cluster_ids if self._launch is not None else []

    @property
    def _launched_at(self) -> float | None:
        """Wall clock of the first pod's creation, so a saved cluster can go on metering."""
        return self._launch.launched_at if self._launch is not None else None

    @property
    def pod_ids(self) -> list[str]:
        return list(self._pod_ids)

    @property
    def cluster_id(self) -> str | None:
        """The Instant Cluster's id (``instant_cluster=True``), once RunPod made it."""
        return self._cluster_ids[0] if self._cluster_ids else None

    @property
    def started(self) -> bool:
        return self._token is not None and bool(self._tunnel_box) and self._tunnel_box[0].is_open

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def head(self) -> SSHTarget:
        if not self._pods:
            raise GpuProxyError(f"{self!r} has no pod yet: call start().")
        return self._ssh_target(self._pods[0])

    def _query(self) -> dict[str, Pod | None]:
        """Every pod of this cluster as RunPod reports it now (None: gone). An Instant Cluster's pods are
        read through the cluster (``/v2/clusters/{id}/pods``)."""
        return self._launch.query() if self._launch is not None else {}

    def detach(self) -> None:
        """Leave the pods running (``gpu-proxy up``): close the tunnel, stop metering, keep the key folder."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._unwatch()
        for tunnel in self._tunnel_box:
            tunnel.close()
        self._tunnel_box.clear()
        self._launch = None
        self._pods = []
        self._token = None

    def _end(self, from_meter: bool = False) -> list[str]:
        self._unwatch(from_meter)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        failures = []
        if self._pod_ids or self._tunnel_box or self._cluster_ids:
            failures = _teardown(self._launch, self._tunnel_box, self._folder)
        elif self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._token = None
        self._pods = []
        return failures
