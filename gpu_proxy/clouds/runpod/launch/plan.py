"""What a launch is asked for (:class:`NodePlan`), the environment each node's entrypoint reads
(``cluster_image/entrypoint.py`` documents it), and the interface both launch modes implement."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from gpu_proxy.clouds.runpod.models import Pod
from gpu_proxy.clusters.ray_node import RayPorts

Progress = Callable[[str], None]


@dataclass(frozen=True)
class NodePlan:
    """Everything the pods of one launch are made from. Nothing secret: RunPod echoes a pod's
    environment back in its API, so the token travels over SSH and the key stays home."""

    name: str  # unique: the pods' names derive from it, and a create is found again by it
    image: str
    gpu_id: str
    gpus_per_node: int
    nodes: int
    cloud: str
    data_centers: tuple[str, ...]
    disk_gb: int
    public_key: str = field(repr=False)
    token_file: str  # on the pod
    token_wait_s: int
    idle_timeout_s: float | None
    ray_ports: RayPorts
    worker_ray_ports: RayPorts
    instant_cluster: bool = False

    @property
    def suffix(self) -> str:
        return self.name.rsplit("-", 1)[-1]

    def node_env(self, role: str, ports: RayPorts, index: int) -> dict[str, str]:
        env = {"PUBLIC_KEY": self.public_key, "SSHD": "on", "RAY_TOKEN_FILE": self.token_file,
               # One folder per node: on RunPod each pod has its own disk; in the tests they share one machine.
               "RAY_TEMP_DIR": f"/tmp/gp-{self.suffix}/r{index}", "RAY_TOKEN_WAIT_S": str(self.token_wait_s)}
        if not self.instant_cluster:
            env["ROLE"] = role  # in an Instant Cluster the node's rank decides (NODE_RANK, set by RunPod)
        if self.nodes > 1:
            env["PRIVATE_IP"] = "auto"  # the node learns its private address itself (entrypoint.py)
        if self.idle_timeout_s is not None:
            env["IDLE_TIMEOUT_S"] = str(int(self.idle_timeout_s))
        for field_name, variable in RayPorts.environment_names().items():
            value = getattr(ports, field_name)
            if value is not None and not (role == "worker" and field_name in ("dashboard", "client_server")):
                env[variable] = str(value)
        return env

    def cluster_env(self) -> dict[str, str]:
        """One environment for every node of an Instant Cluster (RunPod applies one container config to all
        its pods): no ROLE and no HEAD_ADDRESS, as RunPod's NODE_RANK and MASTER_ADDR decide (entrypoint.py).
        Nodes sharing a machine (the tests) need their own ports: ``WORKER_<NAME>_PORT`` for ranks above 0."""
        env = self.node_env("head", self.ray_ports, 0)
        env["RAY_TEMP_DIR"] = f"/tmp/gp-{self.suffix}"  # the entrypoint adds /r<NODE_RANK>
        if self.worker_ray_ports != RayPorts():
            for field_name, variable in RayPorts.environment_names().items():
                value = getattr(self.worker_ray_ports, field_name)
                if value is not None and field_name not in ("gcs", "dashboard", "client_server"):
                    env["WORKER_" + variable] = str(value)
        return env


class Launch(Protocol):
    """One launch mode. ``pod_ids`` and ``launched_at`` are filled as soon as RunPod made something, so
    :meth:`teardown` (also a finalizer at interpreter exit: it never references the cluster) ends it."""

    pod_ids: list[str]
    cluster_ids: list[str]
    launched_at: float | None

    def create(self) -> None: ...

    def wait(self, timeout_s: float) -> list[Pod]:
        """The pods RUNNING with SSH published, head first."""

    def query(self) -> dict[str, Pod | None]:
        """Every pod as RunPod reports it now (None: gone)."""

    def teardown(self, quiet: bool = False) -> list[str]:
        """End what RunPod made (``quiet``: say nothing, at interpreter exit); '<id>: <why>' for what could not be ended."""
