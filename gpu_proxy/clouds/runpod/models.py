"""Typed models of what gpu-proxy sends to and reads from RunPod's REST v2 API: pods, Instant
Clusters, the GPU and data-centre catalog, public templates. ``raw`` keeps each whole answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class SSHEndpoint:
    host: str
    port: int
    username: str


@dataclass(frozen=True)
class Pod:
    """The parts of a RunPod pod that gpu-proxy reads (``raw`` keeps the whole answer)."""

    id: str
    name: str
    status: str  # PROVISIONING, STARTING, RUNNING, EXITED, ERROR, TERMINATED
    cost_per_hour: float
    gpu_id: str | None
    gpu_count: int
    data_center_id: str | None
    ssh_direct: SSHEndpoint | None  # the published 22/tcp; None until the pod runs
    global_ip: str | None
    internal_dns: str | None
    created_at: str
    started_at: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    cluster_id: str | None = None  # the Instant Cluster this pod belongs to, if any
    cluster_rank: int | None = None  # its NODE_RANK there (0: the primary); None until RunPod assigns it
    cluster_ip: str | None = None  # its address on the cluster's private network

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Pod":
        direct = (data.get("ssh") or {}).get("direct")
        gpu = data.get("gpu") or {}
        networking = data.get("globalNetworking") or {}
        member = data.get("cluster") or {}
        return cls(
            id=data["id"], name=data["name"], status=data["status"], cost_per_hour=float(data.get("cost") or 0.0),
            gpu_id=gpu.get("id"), gpu_count=int(gpu.get("count") or 0), data_center_id=data.get("dataCenterId"),
            ssh_direct=SSHEndpoint(direct["host"], int(direct["port"]), direct["username"]) if direct else None,
            global_ip=networking.get("ip"), internal_dns=networking.get("internalDns"),
            created_at=data.get("createdAt", ""), started_at=data.get("startedAt"), raw=data,
            cluster_id=member.get("id"), cluster_rank=member.get("rank"), cluster_ip=member.get("ip"))


@dataclass(frozen=True)
class GpuType:
    id: str  # what pod creation takes, e.g. "NVIDIA H100 80GB HBM3"
    name: str  # display name, e.g. "H100 SXM"
    memory_gb: int
    secure: bool
    community: bool
    price_secure: float  # USD per GPU-hour
    price_community: float
    max_count_secure: int
    max_count_community: int
    availability: str | None = None  # NONE/LOW/MEDIUM/HIGH when asked for
    data_centers: tuple[tuple[str, str], ...] = ()  # (data centre id, availability) when asked for

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "GpuType":
        return cls(id=data["id"], name=data["name"], memory_gb=int(data["memory"]), secure=bool(data["secure"]),
                   community=bool(data["community"]), price_secure=float(data["price"]["secure"]),
                   price_community=float(data["price"]["community"]),
                   max_count_secure=int(data["maxCount"]["secure"]),
                   max_count_community=int(data["maxCount"]["community"]), availability=data.get("availability"),
                   data_centers=tuple((dc["id"], dc["availability"]) for dc in data.get("dataCenters", [])))

    def price(self, cloud: str = "SECURE") -> float:
        return self.price_secure if cloud == "SECURE" else self.price_community

    def max_count(self, cloud: str = "SECURE") -> int:
        return self.max_count_secure if cloud == "SECURE" else self.max_count_community


@dataclass(frozen=True)
class DataCenter:
    id: str
    name: str
    region: str
    global_network: bool
    gpu_availability: tuple[tuple[str, str], ...] = ()  # (GPU type id, availability) when asked for

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DataCenter":
        return cls(id=data["id"], name=data["name"], region=data["region"], global_network=bool(data["globalNetwork"]),
                   gpu_availability=tuple((g["id"], g["availability"]) for g in data.get("gpuAvailability", [])))


@dataclass(frozen=True)
class CreatePodRequest:
    """The body of ``POST /v2/pods`` that gpu-proxy sends (a subset of RunPod's CreatePodRequest)."""

    name: str
    image: str
    gpu_id: str
    gpu_count: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[str, ...] = ("22/tcp",)
    disk_gb: int = 50
    cloud: str = "SECURE"
    data_center_ids: tuple[str, ...] = ()
    global_networking: bool = False

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "image": self.image,
                                "gpu": {"id": self.gpu_id, "count": self.gpu_count}, "env": dict(self.env),
                                "ports": list(self.ports), "disk": self.disk_gb, "cloud": self.cloud}
        if self.data_center_ids:
            body["dataCenterIds"] = list(self.data_center_ids)
        if self.global_networking:
            body["globalNetworking"] = True
        return body


CLUSTER_TYPE = "TRAINING"  # RunPod's generic multi-node cluster; gpu-proxy starts Ray itself (not type RAY)


@dataclass(frozen=True)
class CreateClusterRequest:
    """The body of ``POST /v2/clusters`` that gpu-proxy sends: ``pod_count`` identical pods of
    ``gpus_per_pod`` x ``gpu_id``, one container configuration for all of them (so one ``env`` for every
    node: each node learns its rank from RunPod's ``NODE_RANK``). Instant Clusters have no cloud choice
    and no private registry (the image must be public)."""

    name: str
    image: str
    gpu_id: str
    gpus_per_pod: int
    pod_count: int
    env: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[str, ...] = ("22/tcp",)
    disk_gb: int = 50
    data_center_ids: tuple[str, ...] = ()
    type: str = CLUSTER_TYPE

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "type": self.type,
                                "compute": {"gpuTypeId": self.gpu_id, "gpuCountPerPod": self.gpus_per_pod,
                                            "podCount": self.pod_count},
                                "image": self.image, "env": dict(self.env), "ports": list(self.ports),
                                "disk": self.disk_gb}
        if self.data_center_ids:
            body["dataCenterIds"] = list(self.data_center_ids)
        return body


@dataclass(frozen=True)
class InstantCluster:
    """A RunPod cluster as ``GET /v2/clusters/{id}`` reports it (member pods: :meth:`RunPodClient.cluster_pods`)."""

    id: str
    name: str
    type: str
    gpu_id: str
    gpus_per_pod: int
    pod_count: int
    data_center_id: str | None
    pods_total: int
    pods_by_status: Mapping[str, int]
    primary_pod_id: str | None  # rank 0, once placed
    primary_status: str | None
    primary_ssh: str | None  # "host:port" of the primary's published 22/tcp, once it runs
    created_at: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "InstantCluster":
        compute, pods, primary = data["compute"], data.get("pods") or {}, data.get("primary") or {}
        return cls(id=data["id"], name=data["name"], type=data["type"], gpu_id=compute["gpuTypeId"],
                   gpus_per_pod=int(compute["gpuCountPerPod"]), pod_count=int(compute["podCount"]),
                   data_center_id=data.get("dataCenterId"), pods_total=int(pods.get("total") or 0),
                   pods_by_status=dict(pods.get("byStatus") or {}), primary_pod_id=primary.get("podId"),
                   primary_status=primary.get("status"), primary_ssh=primary.get("sshEndpoint"),
                   created_at=data.get("createdAt", ""), raw=data)


@dataclass(frozen=True)
class Template:
    """One entry of RunPod's public template catalog (``GET /v2/catalog/templates``): a stock image."""

    id: str
    name: str
    image: str
    serverless: bool
    category: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Template":
        return cls(id=data["id"], name=data["name"], image=data["image"], serverless=bool(data.get("serverless")),
                   category=data.get("category"), raw=data)
