"""What a launch checks against RunPod's catalog before money is spent: the GPU type (the cheapest
available of several), the count, the cost against ``max_usd_per_hour`` and ``budget_usd``, and with
no image, the stock image and what its pods get installed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from gpu_proxy.clouds.runpod.gpu_types import (CostEstimate, check_count, choose_gpu, estimate_cost, expand_choices,
                                             resolve_gpu)
from gpu_proxy.clouds.runpod.client import RunPodClient
from gpu_proxy.errors import ConfigurationError


@dataclass(frozen=True)
class Ask:
    """What is asked for, as far as the price goes."""

    gpu_choices: tuple[str, ...]
    gpus_per_node: int
    nodes: int
    cloud: str
    max_usd_per_hour: float | None
    budget_usd: float | None
    expected_hours: float | None


def choose_and_estimate(client: RunPodClient, ask: Ask, progress: Callable[[str], None]) -> CostEstimate:
    """The GPU type (its id is ``estimate.gpu``) and the estimate; raises ConfigurationError when refused."""
    if len(ask.gpu_choices) > 1 or ask.gpu_choices[0].lower().startswith("any"):
        # A choice: the live catalog, read with availability for this many GPUs per pod.
        catalog = client.gpu_types(availability=True, count=ask.gpus_per_node, cloud=ask.cloud)
        gpu = choose_gpu(expand_choices(ask.gpu_choices, catalog, ask.cloud), ask.gpus_per_node, ask.nodes,
                         ask.cloud, ask.max_usd_per_hour)
        progress(f"cheapest available of {', '.join(ask.gpu_choices)}: {gpu.id} "
                 f"(${gpu.price(ask.cloud):.2f}/GPU-hour)")
    else:
        gpu = resolve_gpu(ask.gpu_choices[0], client.gpu_types(), ask.cloud)
    check_count(gpu, ask.gpus_per_node, ask.cloud)
    estimate = estimate_cost(gpu, ask.gpus_per_node, ask.nodes, ask.expected_hours, ask.cloud)
    if ask.max_usd_per_hour is not None and estimate.per_hour > ask.max_usd_per_hour:
        raise ConfigurationError(f"{estimate} is above max_usd_per_hour={ask.max_usd_per_hour:g}: raise it, use "
                                 f"fewer GPUs, or give several types (gpu=[...]) to pick the cheapest available.")
    if ask.budget_usd is not None and estimate.total is not None and estimate.total > ask.budget_usd:
        raise ConfigurationError(f"The expected cost, {estimate}, is above budget_usd={ask.budget_usd:g}: raise the "
                                 f"budget, shorten the run or use fewer/cheaper GPUs.")
    return estimate


def stock_image_plan(client: RunPodClient, requirements: Sequence[str], pip_options: Sequence[str],
                     progress: Callable[[str], None]):
    """(the stock image from RunPod's catalog, what its pods get installed: a node_install.InstallPlan)."""
    from gpu_proxy.clouds.runpod.node_install import install_plan
    from gpu_proxy.clouds.runpod.stock_images import choose_stock_image

    install = install_plan(requirements, pip_options)
    image = choose_stock_image(install.home.get("torch"), client.templates())
    progress(f"no image given: pods start from RunPod's {image} and get home's versions installed over SSH "
             f"(pass image= for a faster start)")
    return image, install
