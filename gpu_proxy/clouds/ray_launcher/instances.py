"""Which instance type holds N GPUs of a kind, per cloud, and what it costs: the one table to edit.

Prices are on-demand list prices in USD per hour in the cloud's main US region (AWS us-east-1,
GCP us-central1, Azure eastus), read from the clouds' price pages in 2025. They are estimates
for the confirmation before launch, not a bill: your region, discounts and spot prices differ,
and the clouds change them. Disks and network egress are extra.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from gpu_proxy.errors import ConfigurationError

CLOUDS = ("aws", "gcp", "azure")


@dataclass(frozen=True)
class InstanceType:
    cloud: str
    name: str  # what the cloud's API takes: InstanceType / machineType / vmSize
    gpu: str  # our canonical GPU name (a key of GPU_ALIASES' values)
    gpus: int
    vcpus: int
    usd_per_hour: float
    accelerator: str | None = None  # GCP N1 machines: the guestAccelerators type the GPUs are attached as

    def __str__(self) -> str:
        return f"{self.name} ({self.gpus} x {self.gpu}, {self.vcpus} vCPUs, ~${self.usd_per_hour:.2f}/hour)"


def _t(cloud, name, gpu, gpus, vcpus, price, accelerator=None) -> InstanceType:
    return InstanceType(cloud, name, gpu, gpus, vcpus, price, accelerator)


TABLE: tuple[InstanceType, ...] = (
    # AWS EC2 (InstanceType)
    _t("aws", "g4dn.xlarge", "T4", 1, 4, 0.526), _t("aws", "g4dn.12xlarge", "T4", 4, 48, 3.912),
    _t("aws", "g4dn.metal", "T4", 8, 96, 7.824),
    _t("aws", "g5.xlarge", "A10G", 1, 4, 1.006), _t("aws", "g5.12xlarge", "A10G", 4, 48, 5.672),
    _t("aws", "g5.48xlarge", "A10G", 8, 192, 16.288),
    _t("aws", "g6.xlarge", "L4", 1, 4, 0.805), _t("aws", "g6.12xlarge", "L4", 4, 48, 4.602),
    _t("aws", "g6.48xlarge", "L4", 8, 192, 13.350),
    _t("aws", "g6e.xlarge", "L40S", 1, 4, 1.861), _t("aws", "g6e.12xlarge", "L40S", 4, 48, 10.493),
    _t("aws", "g6e.48xlarge", "L40S", 8, 192, 30.131),
    _t("aws", "p3.2xlarge", "V100", 1, 8, 3.06), _t("aws", "p3.8xlarge", "V100", 4, 32, 12.24),
    _t("aws", "p3.16xlarge", "V100", 8, 64, 24.48),
    _t("aws", "p4d.24xlarge", "A100", 8, 96, 21.96), _t("aws", "p4de.24xlarge", "A100-80GB", 8, 96, 27.45),
    _t("aws", "p5.48xlarge", "H100", 8, 192, 55.04),
    # GCP Compute Engine (machineType; N1 machines get their GPUs as guestAccelerators)
    _t("gcp", "n1-standard-8", "T4", 1, 8, 0.73, "nvidia-tesla-t4"),
    _t("gcp", "n1-standard-32", "T4", 4, 32, 2.92, "nvidia-tesla-t4"),
    _t("gcp", "n1-standard-8", "V100", 1, 8, 2.86, "nvidia-tesla-v100"),
    _t("gcp", "n1-standard-32", "V100", 4, 32, 11.44, "nvidia-tesla-v100"),
    _t("gcp", "n1-standard-64", "V100", 8, 64, 22.88, "nvidia-tesla-v100"),
    _t("gcp", "g2-standard-8", "L4", 1, 8, 0.85), _t("gcp", "g2-standard-24", "L4", 2, 24, 2.00),
    _t("gcp", "g2-standard-48", "L4", 4, 48, 4.00), _t("gcp", "g2-standard-96", "L4", 8, 96, 8.00),
    _t("gcp", "a2-highgpu-1g", "A100", 1, 12, 3.67), _t("gcp", "a2-highgpu-2g", "A100", 2, 24, 7.35),
    _t("gcp", "a2-highgpu-4g", "A100", 4, 48, 14.69), _t("gcp", "a2-highgpu-8g", "A100", 8, 96, 29.39),
    _t("gcp", "a2-ultragpu-1g", "A100-80GB", 1, 12, 5.07), _t("gcp", "a2-ultragpu-2g", "A100-80GB", 2, 24, 10.14),
    _t("gcp", "a2-ultragpu-4g", "A100-80GB", 4, 48, 20.28), _t("gcp", "a2-ultragpu-8g", "A100-80GB", 8, 96, 40.55),
    _t("gcp", "a3-highgpu-8g", "H100", 8, 208, 88.25),
    # Azure (vmSize)
    _t("azure", "Standard_NC4as_T4_v3", "T4", 1, 4, 0.526), _t("azure", "Standard_NC64as_T4_v3", "T4", 4, 64, 4.352),
    _t("azure", "Standard_NV36ads_A10_v5", "A10", 1, 36, 3.20),
    _t("azure", "Standard_NC6s_v3", "V100", 1, 6, 3.06), _t("azure", "Standard_NC12s_v3", "V100", 2, 12, 6.12),
    _t("azure", "Standard_NC24s_v3", "V100", 4, 24, 12.24),
    _t("azure", "Standard_NC24ads_A100_v4", "A100-80GB", 1, 24, 3.67),
    _t("azure", "Standard_NC48ads_A100_v4", "A100-80GB", 2, 48, 7.35),
    _t("azure", "Standard_NC96ads_A100_v4", "A100-80GB", 4, 96, 14.69),
    _t("azure", "Standard_ND96amsr_A100_v4", "A100-80GB", 8, 96, 32.77),
    _t("azure", "Standard_ND96asr_v4", "A100", 8, 96, 27.20),
    _t("azure", "Standard_NC40ads_H100_v5", "H100", 1, 40, 6.98),
    _t("azure", "Standard_NC80adis_H100_v5", "H100", 2, 80, 13.96),
    _t("azure", "Standard_ND96isr_H100_v5", "H100", 8, 96, 98.32),
)

# What users type -> our canonical name. Keys are compared without case, spaces or dashes.
GPU_ALIASES = {
    "t4": "T4", "a10g": "A10G", "a10": "A10", "l4": "L4", "l40s": "L40S", "v100": "V100",
    "a100": "A100", "a10040gb": "A100", "a100sxm4": "A100", "a10080gb": "A100-80GB", "a10080g": "A100-80GB",
    "h100": "H100", "h10080gb": "H100", "h100sxm": "H100",
}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("nvidia", ""))


def canonical_gpu(name: str) -> str:
    """``"a100 80gb"`` -> ``"A100-80GB"``; unknown names raise with the known ones."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"gpu={name!r}: give a GPU name, e.g. 'A10G', 'L4', 'A100', 'H100'.")
    found = GPU_ALIASES.get(_key(name))
    if found is None:
        known = sorted(set(GPU_ALIASES.values()))
        close = difflib.get_close_matches(name.upper(), known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigurationError(f"gpu={name!r} is not a GPU this version knows an instance type for.{hint} "
                                 f"Known: {', '.join(known)}; or pass instance_type='...' yourself.")
    return found


def instance_for(cloud: str, gpu: str, gpus_per_node: int) -> InstanceType:
    """The cheapest instance type of ``cloud`` with exactly ``gpus_per_node`` x ``gpu``."""
    if cloud not in CLOUDS:
        raise ConfigurationError(f"cloud={cloud!r}: use one of {', '.join(CLOUDS)}.")
    if not isinstance(gpus_per_node, int) or isinstance(gpus_per_node, bool) or gpus_per_node < 1:
        raise ConfigurationError(f"gpus_per_node={gpus_per_node!r} must be a whole number >= 1.")
    wanted = canonical_gpu(gpu)
    offered = [t for t in TABLE if t.cloud == cloud and t.gpu == wanted]
    if not offered:
        clouds = sorted({t.cloud for t in TABLE if t.gpu == wanted})
        raise ConfigurationError(f"{cloud} has no {wanted} instance type in gpu-proxy's table; {wanted} is listed on "
                                 f"{', '.join(clouds)}. Pick another GPU, another cloud, or pass instance_type='...'.")
    exact = sorted((t for t in offered if t.gpus == gpus_per_node), key=lambda t: t.usd_per_hour)
    if not exact:
        counts = ", ".join(str(c) for c in sorted({t.gpus for t in offered}))
        raise ConfigurationError(f"{cloud} has no instance type with {gpus_per_node} x {wanted}; it has {counts} per "
                                 f"machine. Pass gpus_per_node= one of those (and nodes= for more machines).")
    return exact[0]


def find_instance(cloud: str, name: str) -> InstanceType | None:
    """The table's entry for an instance type given by name (``instance_type=``), if listed."""
    return next((t for t in TABLE if t.cloud == cloud and t.name.lower() == name.lower()), None)
