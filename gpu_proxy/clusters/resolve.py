"""Turn what the user passed as ``cluster=`` into a :class:`Cluster`.

A string is, in this order: ``ray://`` (refused, with the fix), a dashboard URL (``http(s)://``),
``ssh://user@host[:port]``, a cluster saved by ``gpu-proxy up`` (running: its name wins), a table of
``clusters.toml``, or a provider name (``local``, ``runpod``, ``runpod_serverless``, ``aws``,
``gcp``, ``azure``; see :mod:`gpu_proxy.clusters.providers`). ``None`` is ``$GPU_PROXY_CLUSTER`` when
set, else the embedded local cluster.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

from gpu_proxy.clusters.base import Cluster
from gpu_proxy.errors import ConfigurationError

if TYPE_CHECKING:
    from gpu_proxy.runs.spec import RunSpec

ClusterSpec = Union[Cluster, str, None]


def resolve_cluster(spec: ClusterSpec) -> Cluster:
    """``None``: ``$GPU_PROXY_CLUSTER`` or the embedded local cluster; a Cluster: itself; a string: see above."""
    from gpu_proxy.clusters import providers

    if spec is None:
        spec = providers.from_environment()
        if spec is None:
            from gpu_proxy.clusters.local import default_local_cluster

            return default_local_cluster()
        where = f"{providers.ENV_VAR}={spec!r}: "
    else:
        where = ""
    if isinstance(spec, Cluster):
        return spec
    if not isinstance(spec, str):
        raise ConfigurationError(
            f"cluster={spec!r} is a {type(spec).__name__}; pass None (embedded local cluster), a "
            "gpu_proxy Cluster object, a provider name ('runpod', 'aws', ...), a dashboard address "
            "'http://host:8265', or a saved cluster name.")
    if spec.startswith("ray://"):
        raise ConfigurationError(
            f"{where}cluster={spec!r}: gpu-proxy does not use Ray Client (ray://), which Ray no longer "
            "maintains. Pass the cluster's dashboard address instead, e.g. "
            f"cluster='http://{spec[len('ray://'):].split(':')[0]}:8265' (through an SSH tunnel if it "
            "is remote: gpu_proxy.SSHCluster does that for you).")
    if spec.startswith(("http://", "https://", "ssh://")):
        return providers.RemoteGPU(spec)
    if spec == "embedded":
        spec = "local"
    from gpu_proxy.clusters.saved import saved_clusters

    definition = saved_clusters().get(spec)
    if definition is not None:
        return _open_saved(spec, definition)
    if spec in providers.configured_clusters() or spec in providers.PROVIDERS:
        try:
            return providers.RemoteGPU(spec)
        except ConfigurationError as error:
            raise ConfigurationError(f"{where}{error}") from None
    raise ConfigurationError(f"{where}cluster={spec!r} is not a provider, a configured cluster or a saved one. "
                             f"{providers.known_names()}")


def _open_saved(name: str, definition: dict) -> Cluster:
    if definition.get("kind") == "ray_launcher":  # `gpu-proxy up aws|gcp|azure`
        from gpu_proxy.clouds.ray_launcher.cluster import SavedLauncherCluster

        return SavedLauncherCluster(name, definition)
    from gpu_proxy.clusters.saved import load_saved_cluster

    return load_saved_cluster(name)


def check_cluster_spec(spec: ClusterSpec) -> None:
    """Fail now, not at the first fit, on a cluster name that cannot resolve (builds nothing, launches nothing)."""
    from gpu_proxy.clusters import providers
    from gpu_proxy.clusters.saved import saved_clusters

    where = ""
    if spec is None:
        spec = providers.from_environment()
        where = f"{providers.ENV_VAR}={spec!r}: "
    if spec is None or isinstance(spec, Cluster) or not isinstance(spec, str):
        return
    if spec.startswith(("ray://", "http://", "https://")):
        return
    if spec.startswith("ssh://"):
        providers.parse_ssh_url(spec)
        return
    if spec in ("local", "embedded") or spec in saved_clusters():
        return
    configured = providers.configured_clusters()
    if spec in configured:
        table = dict(configured[spec])
        name = str(table.pop("provider", spec))
        provider = providers.PROVIDERS.get(name)
        if provider is None:
            raise ConfigurationError(f"{providers.config_file()} [{spec}]: provider={name!r} is "
                                     f"unknown. {providers.known_names()}")
        providers.check_options(provider, table, where=f"{providers.config_file()} [{spec}]: ")
        return
    if spec in providers.PROVIDERS:
        providers.check_options(providers.PROVIDERS[spec], {})
        return
    raise ConfigurationError(f"{where}cluster={spec!r} is not a provider, a configured cluster or a saved one. "
                             f"{providers.known_names()}")


def start_early(spec: ClusterSpec, warm: "RunSpec | None" = None, modules: tuple[str, ...] = ()) -> None:
    """Start the embedded cluster in the background if ``spec`` means it (a strategy or RemoteFit was
    just made; its first run comes soon), and with ``warm`` the worker processes for runs like it,
    importing ``modules`` there. Other clusters start on the first run, where errors show."""
    from gpu_proxy.clusters import providers
    from gpu_proxy.clusters.local import LocalCluster, default_local_cluster

    if spec is None and providers.from_environment() is None:
        cluster = default_local_cluster()
    elif isinstance(spec, LocalCluster):
        cluster = spec
    else:
        return
    if warm is None:
        cluster.start_in_background()
    else:
        cluster.warm_in_background(warm, modules)
