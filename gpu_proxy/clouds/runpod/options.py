"""The checks of ``RunPodCluster(...)``'s arguments that need no network: a bad value is refused when
the object is made, naming the value and the fix, before anything is read from RunPod."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from gpu_proxy.clouds.runpod.gpu_types import CLOUDS, check_money
from gpu_proxy.errors import ConfigurationError

IMAGE_ENV = "GPU_PROXY_RUNPOD_IMAGE"


def parse_duration(value: "str | float | int | None", what: str = "idle_timeout") -> float | None:
    """``600``, ``"600"``, ``"90s"``, ``"10m"``, ``"1h"`` -> seconds; None -> None."""
    if value is None:
        return None
    text = str(value).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        seconds = -1
    if not math.isfinite(seconds) or seconds <= 0:  # "nan" and "inf" parse as floats, and would crash later
        raise ConfigurationError(f"{what}={value!r}: give a positive duration, e.g. 600, '90s', '10m' or '1h'.")
    return seconds


def requirement_list(value: "Sequence[str] | str") -> tuple[str, ...]:
    """Requirements as given, or read from a requirements.txt path (comments and blank lines dropped)."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigurationError(f"requirements={value!r}: give a list of requirements (['einops==0.8.1']) or "
                                     f"the path of a requirements.txt.")
        value = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return tuple(item.strip() for item in value if item and item.strip())


def gpu_choices(gpu: "str | Sequence[str]") -> tuple[str, ...]:
    """One GPU type, or several (a list, or ``"a,b"``): the cheapest available of them is chosen at launch."""
    if isinstance(gpu, (list, tuple)) and gpu and all(isinstance(g, str) and g.strip() for g in gpu):
        return tuple(g.strip() for g in gpu)
    if isinstance(gpu, str) and gpu.strip():
        return tuple(p.strip() for p in gpu.split(",") if p.strip())
    raise ConfigurationError(f"gpu={gpu!r}: give a RunPod GPU type, e.g. 'NVIDIA H100 80GB HBM3', a list "
                             f"(['H100 SXM', 'A100 80GB']: the cheapest available) or 'any-80gb'.")


def check_shape(gpus_per_node: int, nodes: int, instant_cluster: bool, cloud: str) -> None:
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ConfigurationError(f"gpus_per_node={gpus_per_node!r} must be a whole number >= 1.")
    if not isinstance(nodes, int) or nodes < 1:
        raise ConfigurationError(f"nodes={nodes!r} must be a whole number >= 1.")
    if instant_cluster and nodes < 2:
        raise ConfigurationError(f"instant_cluster=True needs nodes >= 2 (got nodes={nodes}): one node is one pod.")
    if instant_cluster and cloud != "SECURE":
        raise ConfigurationError(f"instant_cluster=True with cloud={cloud!r}: RunPod's Instant Clusters run on its "
                                 f"secure cloud only (their create request has no cloud); use cloud='SECURE'.")


def check_money_limits(budget_usd: float | None, max_usd_per_hour: float | None) -> float | None:
    check_money(budget_usd, "budget_usd")
    return check_money(max_usd_per_hour, "max_usd_per_hour")


def check_place(cloud: str, data_centers: Sequence[str]) -> None:
    if cloud not in CLOUDS:
        raise ConfigurationError(f"cloud={cloud!r}: use 'SECURE' or 'COMMUNITY'.")
    if isinstance(data_centers, str):
        raise ConfigurationError(f"data_centers={data_centers!r}: pass a list, e.g. ['US-TX-3'].")


def node_image(image: str | None, requirements: "Sequence[str] | str",
               pip_options: Sequence[str]) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    """(image or ``$GPU_PROXY_RUNPOD_IMAGE`` or None for the stock image, requirements, pip options)."""
    image = image or os.environ.get(IMAGE_ENV) or None
    extras, options = requirement_list(requirements), tuple(pip_options)
    if (extras or options) and image is not None:
        raise ConfigurationError("requirements=/pip_options= are installed on pods started from RunPod's stock "
                                 "image; with image= put them in the image instead (or drop image=).")
    return image, extras, options
