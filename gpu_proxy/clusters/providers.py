"""One word picks the provider: ``RemoteGPU("runpod", gpu="H100 SXM")``, ``cluster="aws"``, a table
in ``clusters.toml``, or ``GPU_PROXY_CLUSTER=runpod`` in the environment.

Each provider is a cluster class and the keyword arguments it takes; a name never imports a cloud
SDK until that provider is used. Options are checked against the class's signature before anything
is built, so a typo fails naming the option and listing the valid ones.

``~/.config/gpu-proxy/clusters.toml`` (``$XDG_CONFIG_HOME``, ``$GPU_PROXY_CONFIG_DIR``) holds one
table per named cluster::

    [big]
    provider = "runpod"
    gpu = ["H100 SXM", "A100 80GB"]
    gpus_per_node = 8
    max_usd_per_hour = 30

A table named like a provider (``[runpod]``) gives that provider's defaults, so
``GPU_PROXY_CLUSTER=runpod`` works with no code. Secrets are refused there (keys, tokens,
passwords): they come from the environment or the provider's own credential store.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from gpu_proxy.clusters.base import Cluster
from gpu_proxy.errors import ConfigurationError

ENV_VAR = "GPU_PROXY_CLUSTER"


@dataclass(frozen=True)
class Provider:
    name: str
    target: str  # "module:Class"
    summary: str
    fixed: Mapping[str, Any] = None  # arguments the name itself sets (cloud="aws")
    secrets_from: str = ""  # where this provider's credentials come from, for the refusal message

    def cls(self) -> type:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def options(self) -> dict[str, inspect.Parameter]:
        """The keyword arguments this provider takes (the class's, less those the name fixes)."""
        parameters = dict(inspect.signature(self.cls().__init__).parameters)
        parameters.pop("self", None)
        for name in dict(self.fixed or {}):
            parameters.pop(name, None)
        return {k: p for k, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


_LAUNCHER = "gpu_proxy.clouds.ray_launcher.cluster:LauncherCluster"
_CLOUD_CREDENTIALS = {"aws": "AWS's own credentials (~/.aws/credentials, AWS_PROFILE, an instance role)",
                      "gcp": "gcloud's application-default credentials (`gcloud auth application-default login`)",
                      "azure": "the Azure CLI's login (`az login`)"}
PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("local", "gpu_proxy.clusters.local:LocalCluster", "an embedded Ray cluster in this process"),
    Provider("runpod", "gpu_proxy.clouds.runpod.cluster:RunPodCluster", "RunPod GPU pods, launched for the run",
             secrets_from="RUNPOD_API_KEY or ~/.runpod/config.toml"),
    Provider("runpod_serverless", "gpu_proxy.clouds.runpod.serverless.cluster:RunPodServerless",
             "a RunPod serverless endpoint, one worker per run", secrets_from="RUNPOD_API_KEY or ~/.runpod/config.toml"),
    Provider("ssh", "gpu_proxy.clusters.ssh:SSHCluster", "Ray started over SSH on machines of yours (ssh://user@host)"),
    Provider("ray", "gpu_proxy.clusters.ray_cluster:RayCluster", "an existing Ray cluster by dashboard address",
             secrets_from="RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"),
    *(Provider(cloud, _LAUNCHER, f"{cloud.upper()} GPU machines made by Ray's cluster launcher", {"cloud": cloud},
               _CLOUD_CREDENTIALS[cloud]) for cloud in ("aws", "gcp", "azure")),
)}

# Keys that name a secret: never read from clusters.toml (it is a plain file, often in dotfiles repos).
_SECRET_KEY = re.compile(r"(api_?key|token|secret|password|passwd|credential|access_key)", re.IGNORECASE)


def config_file():
    from gpu_proxy.clusters.saved import config_dir

    return config_dir() / "clusters.toml"


def configured_clusters() -> dict[str, dict[str, Any]]:
    """The tables of ``clusters.toml`` (empty when there is none), secrets refused."""
    import tomllib

    path = config_file()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"{path}: not valid TOML ({error}). Fix the file or move it away.") from None
    tables = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigurationError(f"{path}: {name!r} must be a table ([{name}] with provider = \"...\" and options).")
        provider = PROVIDERS.get(str(table.get("provider", name)))
        for key in table:
            if _SECRET_KEY.search(key):
                where = provider.secrets_from if provider and provider.secrets_from else "the environment"
                raise ConfigurationError(
                    f"{path} [{name}]: {key!r} is a secret, and gpu-proxy never reads secrets from this file "
                    f"(it is a plain config file). Remove it; the credential comes from {where}.")
        tables[name] = dict(table)
    return tables


def known_names() -> str:
    """A sentence listing the valid provider names and the configured and saved cluster names."""
    from gpu_proxy.clusters.saved import saved_clusters

    names = ", ".join(repr(n) for n in PROVIDERS if n != "ssh") + ", 'ssh://user@host[:port]', 'http://host:8265'"
    try:
        configured = sorted(configured_clusters())
    except ConfigurationError:
        configured = []
    saved = sorted(saved_clusters())
    return (f"Providers: {names}. Configured in {config_file()}: {', '.join(configured) or 'none'}. "
            f"Saved (gpu-proxy up): {', '.join(saved) or 'none'}.")


def check_options(provider: Provider, options: Mapping[str, Any], where: str = "") -> None:
    """Unknown or missing options fail naming them and listing the valid ones, before anything is built."""
    valid = provider.options()
    unknown = [key for key in options if key not in valid]
    if unknown:
        raise ConfigurationError(
            f"{where}provider {provider.name!r} has no option {', '.join(map(repr, unknown))}. "
            f"Valid options: {', '.join(valid)}.")
    missing = [key for key, p in valid.items() if p.default is p.empty and key not in options]
    if missing:
        raise ConfigurationError(
            f"{where}provider {provider.name!r} needs {', '.join(map(repr, missing))}: pass "
            f"RemoteGPU({provider.name!r}, {missing[0]}=...) or add {missing[0]} = ... to a [{provider.name}] table "
            f"in {config_file()}.")


def build(provider_name: str, options: Mapping[str, Any] | None = None, where: str = "") -> Cluster:
    """The cluster object of ``provider_name`` with ``options`` (checked first)."""
    provider = PROVIDERS.get(provider_name)
    if provider is None:
        raise ConfigurationError(f"{where}provider={provider_name!r} is unknown. {known_names()}")
    options = dict(options or {})
    if provider.name == "local" and not options:
        from gpu_proxy.clusters.local import default_local_cluster

        return default_local_cluster()  # the one process-wide embedded cluster
    check_options(provider, options, where)
    return provider.cls()(**dict(provider.fixed or {}), **options)


def parse_ssh_url(url: str) -> str:
    """``ssh://user@host[:port]`` -> ``user@host[:port]``."""
    destination = url[len("ssh://"):].rstrip("/")
    if not re.fullmatch(r"[^@/\s]+@[^@/:\s]+(:\d+)?", destination):
        raise ConfigurationError(f"cluster={url!r}: write it as 'ssh://user@host' or 'ssh://user@host:2222'.")
    return destination


def RemoteGPU(provider: str, **options: Any) -> Cluster:  # noqa: N802 (the seed's spelling: reads like a class)
    """The cluster of ``provider`` with ``options``: ``RemoteGPU("runpod", gpu="H100 SXM", gpus_per_node=8)``,
    ``RemoteGPU("aws", gpu="A10G", nodes=2)``, ``RemoteGPU("ssh://me@10.0.0.5", workers=[...])``,
    ``RemoteGPU("local")``. A name configured in clusters.toml takes its table's options, which ``options``
    override. Pass the result as ``cluster=`` (or use it in a ``with`` block)."""
    if not isinstance(provider, str) or not provider:
        raise ConfigurationError(f"provider={provider!r}: give a provider name. {known_names()}")
    if provider.startswith("ssh://"):
        return build("ssh", {"head": parse_ssh_url(provider), **options}, where=f"{provider}: ")
    if provider.startswith(("http://", "https://")):
        return build("ray", {"address": provider, **options})
    configured = configured_clusters()
    if provider in configured:
        table = dict(configured[provider])
        name = str(table.pop("provider", provider))
        return build(name, {**table, **options}, where=f"{config_file()} [{provider}]: ")
    return build(provider, options)


def from_environment() -> str | None:
    """``$GPU_PROXY_CLUSTER`` when set and not empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    return value or None
