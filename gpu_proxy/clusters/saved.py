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


def save_token(name: str, token: str) -> str:
    """Keep a cluster's token beside its definition, readable by this user only."""
    folder = config_dir() / "tokens"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / name
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(token)
    return str(path)


def state_folder(kind: str, name: str) -> Path:
    """A private folder for what a saved cluster of ``kind`` keeps besides its definition (SSH keys)."""
    folder = config_dir() / kind / name
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


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
    if kind == "local":  # `gpu-proxy up local`: a kept ray start on this machine's loopback
        from gpu_proxy.clusters.ray_cluster import RayCluster

        return RayCluster(definition["address"], token=Path(definition["token_file"]).read_text().strip())
    if kind == "ssh":
        from gpu_proxy.clusters.tunneled import TunneledRayCluster

        cluster = TunneledRayCluster(definition["head"], definition["dashboard_port"],
                                     token=Path(definition["token_file"]).read_text().strip(),
                                     identity_file=definition.get("identity_file"),
                                     known_hosts_file=definition.get("known_hosts_file"),
                                     host_key_policy=definition.get("host_key_policy", "accept-new"))
        cluster.owns_nodes = True  # `gpu-proxy up ssh` started them; `down` stops them
        return cluster
    if kind == "runpod":
        from gpu_proxy.clouds.runpod.saved import SavedRunPodCluster

        token_file = Path(definition["token_file"])
        if not token_file.is_file():
            raise ConfigurationError(f"saved RunPod cluster {name!r}: its token file {token_file} is missing; "
                                     f"`gpu-proxy down {name}` terminates its pods.")
        return SavedRunPodCluster(name, {**definition, "kind": kind}, token_file.read_text().strip())
    raise ConfigurationError(f"saved cluster {name!r} has kind {kind!r}, which this version cannot open.")
