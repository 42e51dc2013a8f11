"""Clusters saved by name (``gpu-proxy up --name``), kept under the user's config directory."""
from __future__ import annotations

import json
import os
from pathlib import Path

from gpu_proxy.clusters.base import Cluster
from gpu_proxy.errors import ConfigurationError


def config_dir() -> Path:
    base = os.environ.get("GPU_PROXY_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "gpu-proxy")
    return Path(base)


def clusters_file() -> Path:
    return config_dir() / "clusters.json"


def saved_clusters() -> dict[str, dict]:
    path = clusters_file()
    return json.loads(path.read_text()) if path.exists() else {}


def save_cluster(name: str, definition: dict) -> None:
    clusters = saved_clusters()
    clusters[name] = definition
    path = clusters_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clusters, indent=2, sort_keys=True))


def forget_cluster(name: str) -> None:
    clusters = saved_clusters()
    clusters.pop(name, None)
    clusters_file().parent.mkdir(parents=True, exist_ok=True)
    clusters_file().write_text(json.dumps(clusters, indent=2, sort_keys=True))


def load_saved_cluster(name: str) -> Cluster:
    clusters = saved_clusters()
    if name not in clusters:
        known = ", ".join(sorted(clusters)) or "none saved yet"
        raise ConfigurationError(
            f"cluster={name!r} is not an address and no cluster of that name is saved ({known}). "
            "Pass None for the embedded cluster, 'http://host:8265' for a Ray dashboard, or save one "
            "with `gpu-proxy up`.")
    definition = dict(clusters[name])
    kind = definition.pop("kind")
    if kind == "ray":
        from gpu_proxy.clusters.ray_cluster import RayCluster

        return RayCluster(**definition)
    raise ConfigurationError(f"saved cluster {name!r} has kind {kind!r}, which this version cannot open.")
