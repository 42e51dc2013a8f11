"""GPU names and prices from RunPod's catalog (``GET /v2/catalog/gpus``), and cost estimates.

Users type GPU names loosely ("H100", "a100 80gb", "RTX 4090"); pod creation needs RunPod's exact
GPU type id ("NVIDIA H100 80GB HBM3"). :func:`resolve_gpu` maps one to the other or says which
names are close, before anything is launched.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Sequence

from gpu_proxy.clouds.runpod.client import GpuType
from gpu_proxy.errors import ConfigurationError

CLOUDS = ("SECURE", "COMMUNITY")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def resolve_gpu(name: str, gpus: Sequence[GpuType], cloud: str = "SECURE") -> GpuType:
    """The catalog entry ``name`` means: its exact id or display name (any case), else the one entry
    whose id or name contains all of ``name``'s words. Raises ConfigurationError with close names."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"gpu={name!r}: give a RunPod GPU type, e.g. 'NVIDIA H100 80GB HBM3' or 'H100 SXM'.")
    offered = [gpu for gpu in gpus if (gpu.secure if cloud == "SECURE" else gpu.community)]
    wanted = name.strip().lower()
    for gpu in offered:
        if wanted in (gpu.id.lower(), gpu.name.lower()):
            return gpu
    words = _words(name)
    matches = [gpu for gpu in offered
               if words and all(word in _words(gpu.id) + _words(gpu.name) for word in words)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        listed = "\n".join(f"  {gpu.id!r} ({gpu.name}, {gpu.memory_gb} GB, ${gpu.price(cloud):.2f}/GPU-h)"
                           for gpu in sorted(matches, key=lambda g: g.id))
        raise ConfigurationError(f"gpu={name!r} matches several RunPod GPU types; pick one:\n{listed}")
    labels = {gpu.id: gpu.id for gpu in offered} | {gpu.name: gpu.id for gpu in offered}
    close = difflib.get_close_matches(name, list(labels), n=5, cutoff=0.4)
    close += [label for label in difflib.get_close_matches(wanted, [k.lower() for k in labels], n=5, cutoff=0.4)]
    suggestions = []
    for label in close:
        gpu_id = labels.get(label) or next(v for k, v in labels.items() if k.lower() == label)
        if gpu_id not in suggestions:
            suggestions.append(gpu_id)
    elsewhere = [gpu.id for gpu in gpus if gpu not in offered and wanted in (gpu.id.lower(), gpu.name.lower())]
    message = f"gpu={name!r} is not a GPU type RunPod offers on its {cloud.lower()} cloud."
    if elsewhere:
        other = CLOUDS[1 - CLOUDS.index(cloud)]
        message += f" It is offered on the {other.lower()} cloud: pass cloud={other!r}."
    elif suggestions:
        message += " Did you mean: " + ", ".join(repr(s) for s in suggestions[:5]) + "?"
    else:
        message += " Known types: " + ", ".join(sorted(repr(g.id) for g in offered)[:20]) + "."
    raise ConfigurationError(message)


def check_count(gpu: GpuType, gpus_per_node: int, cloud: str = "SECURE") -> None:
    """Refuse more GPUs per pod than RunPod's largest machine of that type has."""
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ConfigurationError(f"gpus_per_node={gpus_per_node!r} must be a whole number >= 1.")
    limit = gpu.max_count(cloud)
    if gpus_per_node > limit:
        raise ConfigurationError(
            f"gpus_per_node={gpus_per_node}: a RunPod pod of {gpu.id} has at most {limit} GPUs on the "
            f"{cloud.lower()} cloud. Use nodes= to add more machines.")


@dataclass(frozen=True)
class CostEstimate:
    gpu: str
    gpus_per_node: int
    nodes: int
    price_per_gpu_hour: float
    hours: float | None

    @property
    def per_hour(self) -> float:
        return self.price_per_gpu_hour * self.gpus_per_node * self.nodes

    @property
    def total(self) -> float | None:
        return None if self.hours is None else self.per_hour * self.hours

    def __str__(self) -> str:
        text = (f"{self.nodes} x {self.gpus_per_node} x {self.gpu} at ${self.price_per_gpu_hour:.2f}/GPU-hour = "
                f"${self.per_hour:.2f}/hour")
        if self.hours is not None:
            text += f", about ${self.total:.2f} for {self.hours:g} h"
        return text + " (list price; RunPod bills per second; disk and network storage extra)"


def estimate_cost(gpu: GpuType, gpus_per_node: int = 1, nodes: int = 1, hours: float | None = None,
                  cloud: str = "SECURE") -> CostEstimate:
    """What ``nodes`` pods of ``gpus_per_node`` x ``gpu`` cost per hour, and for ``hours`` if given."""
    if cloud not in CLOUDS:
        raise ConfigurationError(f"cloud={cloud!r}: use 'SECURE' or 'COMMUNITY'.")
    if not isinstance(nodes, int) or nodes < 1:
        raise ConfigurationError(f"nodes={nodes!r} must be a whole number >= 1.")
    if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float))
                              or not math.isfinite(hours) or hours < 0):
        raise ConfigurationError(f"hours={hours!r} must be a finite number of hours >= 0.")
    check_count(gpu, gpus_per_node, cloud)
    return CostEstimate(gpu.id, gpus_per_node, nodes, gpu.price(cloud), hours)


def check_money(value: "float | None", what: str) -> "float | None":
    """A money limit must be a finite positive number (``nan`` would never be reached, ``inf`` is no limit)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{what}={value!r} must be a finite positive number of US dollars, e.g. {what}=50; "
                                 f"leave it out for no limit.")
    return float(value)


_MEMORY_CLASS = re.compile(r"any(?:-(\d+)\s*gb)?", re.IGNORECASE)


def expand_choices(names: "str | Sequence[str]", gpus: Sequence[GpuType], cloud: str = "SECURE") -> list[GpuType]:
    """The catalog entries a ``gpu=`` list means, in the order given. ``"any-80gb"`` is every type with at
    least 80 GB per GPU; ``"any"`` every type; a comma-separated string is a list."""
    if isinstance(names, str):
        names = [part for part in (p.strip() for p in names.split(",")) if part] if "," in names else [names]
    if not names:
        raise ConfigurationError("gpu=[]: name at least one RunPod GPU type, e.g. ['H100 SXM', 'A100 80GB'] or 'any-80gb'.")
    offered = [gpu for gpu in gpus if (gpu.secure if cloud == "SECURE" else gpu.community)]
    chosen: list[GpuType] = []
    for name in names:
        shorthand = _MEMORY_CLASS.fullmatch(name.strip()) if isinstance(name, str) else None
        if shorthand:
            memory = int(shorthand.group(1) or 0)
            matches = [gpu for gpu in offered if gpu.memory_gb >= memory]
            if not matches:
                largest = max((gpu.memory_gb for gpu in offered), default=0)
                raise ConfigurationError(f"gpu={name!r}: RunPod's {cloud.lower()} cloud has no GPU type with {memory} GB "
                                         f"or more (the largest has {largest} GB).")
        else:
            matches = [resolve_gpu(name, gpus, cloud)]
        chosen += [gpu for gpu in matches if gpu not in chosen]
    return chosen


def choose_gpu(candidates: Sequence[GpuType], gpus_per_node: int, nodes: int, cloud: str = "SECURE",
               max_usd_per_hour: "float | None" = None) -> GpuType:
    """The cheapest of ``candidates`` that RunPod has in stock now for ``gpus_per_node`` per pod (the catalog
    read with availability for that count) and that fits ``max_usd_per_hour`` for the whole cluster."""
    fits = [gpu for gpu in candidates if gpu.max_count(cloud) >= gpus_per_node]
    if not fits:
        raise ConfigurationError(f"gpus_per_node={gpus_per_node}: none of {', '.join(g.id for g in candidates)} comes "
                                 f"with that many GPUs in one RunPod pod; use nodes= to add machines.")
    in_stock = sorted((gpu for gpu in fits if gpu.availability not in (None, "NONE")), key=lambda g: g.price(cloud))
    if not in_stock:
        raise ConfigurationError(f"None of {', '.join(repr(g.id) for g in fits)} is available on RunPod now for "
                                 f"{gpus_per_node} GPU(s) per pod ({cloud.lower()} cloud). Add other types to gpu=, "
                                 f"try fewer GPUs per pod, or try again later.")
    per_hour = lambda gpu: gpu.price(cloud) * gpus_per_node * nodes  # noqa: E731
    if max_usd_per_hour is not None:
        affordable = [gpu for gpu in in_stock if per_hour(gpu) <= max_usd_per_hour]
        if not affordable:
            cheapest = in_stock[0]
            raise ConfigurationError(
                f"No available GPU type fits max_usd_per_hour={max_usd_per_hour:g}: the cheapest available candidate, "
                f"{cheapest.id!r} ({cheapest.name}), costs ${per_hour(cheapest):.2f}/hour for {nodes} x {gpus_per_node} "
                f"GPU(s) (${cheapest.price(cloud):.2f}/GPU-hour). Raise the limit, use fewer GPUs, or add cheaper types.")
        in_stock = affordable
    return in_stock[0]
