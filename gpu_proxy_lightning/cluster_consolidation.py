"""Consolidate a sharded checkpoint on the cluster: for models that do not fit home's memory.

One worker (as many resources as asked, e.g. a high-memory CPU node) reads the shards from the
run's storage and writes one plain checkpoint back beside them; only its URL comes home.
"""
from __future__ import annotations

from typing import Any

from gpu_proxy import shipping
from gpu_proxy.clusters.resolve import ClusterSpec, resolve_cluster
from gpu_proxy.runs import RunSpec, WorkerContext, execute, values
from gpu_proxy.secrets import conceal
from gpu_proxy_lightning.sharded_checkpoints import consolidate_checkpoint


class _Consolidate:
    """The payload: called once, on the cluster's worker."""

    def __init__(self, url: str, output_url: str | None, storage_options: dict[str, Any] | None) -> None:
        self.url, self.output_url, self.storage_options = url, output_url, storage_options

    def __call__(self, ctx: WorkerContext) -> str:
        return consolidate_checkpoint(self.url, self.output_url, self.storage_options)


def consolidate_on_cluster(url: str, cluster: ClusterSpec = None, output_url: str | None = None,
                           storage_options: dict[str, Any] | None = None,
                           resources: dict[str, float] | None = None, staging_dir: str | None = None) -> str:
    """:func:`~gpu_proxy_lightning.consolidate_checkpoint`, run on ``cluster`` (as in ``RemoteStrategy``).

    ``resources``: what the one worker needs from Ray (default ``{"CPU": 1}``); its node must hold the
    whole model in memory. ``staging_dir``: for a cluster given by address, as in ``RemoteStrategy``.
    Returns the consolidated checkpoint's URL (default ``<name>.full.ckpt`` beside ``url``).
    """
    secrets: dict[str, str] = {}
    options = conceal(dict(storage_options)) if storage_options else None  # credentials travel beside it
    payload = shipping.pack(_Consolidate(url, output_url, options), "the consolidation", secrets=secrets)
    spec = RunSpec(payload=payload, secrets=secrets, num_workers=1, resources_per_worker=resources or {"CPU": 1.0},
                   worker_pool="lightning", staging_dir=staging_dir, staging_options=options)
    (consolidated,) = values(execute(resolve_cluster(cluster), spec, lambda event: None))
    return consolidated
