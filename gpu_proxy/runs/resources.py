"""What a run's workers ask Ray for, and checking that request against what the cluster has, before
anything is placed."""
from __future__ import annotations

from typing import Any, Mapping

import ray

from gpu_proxy.errors import ClusterResourceError


def per_worker_resources(resources_per_worker: Mapping[str, float] | None, gpu: bool) -> dict[str, float]:
    """The Ray resources of one worker: the user's ``resources_per_worker`` (default one CPU), with
    one GPU added when ``gpu`` and the user named no GPU amount (an explicit ``{"GPU": 0}`` stays).

    Each framework decides ``gpu`` (Lightning from ``use_gpu`` or the Trainer's accelerator, Keras
    from ``use_gpu``) and checks its own contradictions first, in its own argument names."""
    resources = dict(resources_per_worker or {"CPU": 1.0})
    if gpu:
        resources.setdefault("GPU", 1.0)
    return resources


def _fmt(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object_store"))}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


def alive_node_resources() -> list[dict[str, float]]:
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def check_fits(num_workers: int, per_worker: dict[str, float], nodes: list[dict[str, Any]] | None = None) -> None:
    """Raise :class:`ClusterResourceError` when ``num_workers`` x ``per_worker`` can never be placed."""
    nodes = alive_node_resources() if nodes is None else nodes
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.items():
            totals[key] = totals.get(key, 0.0) + value
    wanted = {key: value * num_workers for key, value in per_worker.items() if value}
    short = {key: value for key, value in wanted.items() if totals.get(key, 0.0) < value}
    per_node = [f"{_fmt(node)}" for node in nodes]
    if short:
        raise ClusterResourceError(
            f"The run asks for {num_workers} workers x ({_fmt(per_worker)}) = {_fmt(wanted)}, but the "
            f"cluster has {_fmt({k: totals.get(k, 0.0) for k in wanted})} in all "
            f"({len(nodes)} node(s): {'; '.join(per_node)}). Ask for fewer workers (num_workers / "
            "devices x num_nodes), fewer resources_per_worker, or use a bigger cluster."
        )
    if not any(all(node.get(k, 0.0) >= v for k, v in per_worker.items() if v) for node in nodes):
        raise ClusterResourceError(
            f"No single node can hold one worker of ({_fmt(per_worker)}); the nodes have: "
            f"{'; '.join(per_node)}. Lower resources_per_worker."
        )
