"""``RemoteStrategy``: Lightning's DDP, with the processes on a Ray cluster instead of this machine."""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

from gpu_proxy.clusters.base import Cluster
from gpu_proxy.clusters.resolve import ClusterSpec, resolve_cluster
from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs import WorkerContext
from gpu_proxy.runs.heartbeat import MIN_GRACE_S
from gpu_proxy.secrets import conceal
from gpu_proxy_lightning.environment import RemoteWorkerEnvironment
from gpu_proxy_lightning.remote_accelerator import RemoteCUDAAccelerator


class RemoteStrategy(DDPStrategy):
    """Run ``fit``/``validate``/``test``/``predict`` as multi-worker DDP on a Ray cluster.

    Args:
        cluster: where to run: ``None`` for the embedded local Ray cluster, a :class:`~gpu_proxy.Cluster`,
            a Ray dashboard address (``"http://head:8265"``) or a cluster name saved by the CLI.
        num_workers: how many DDP processes; default ``devices x num_nodes`` of the Trainer.
        use_gpu: one GPU per worker (NCCL); default: the Trainer's ``accelerator`` is ``"gpu"``/``"cuda"``.
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 4, "GPU": 1}``.
        home_loggers: Lightning loggers that run here, at home, and receive every ``log_hyperparams``
            and ``log_metrics`` call of rank 0's loggers live, while the run goes on.
        detach: submit the run and return at once (Ray Job clusters only); ``strategy.run_id`` names
            it for ``gpu-proxy attach RUN_ID`` / :func:`gpu_proxy.attach`.
        home_grace_s: on a Ray Job cluster, a run whose home stops following it (laptop closed, process
            killed) stops after this many seconds, so no GPU time burns unwatched; ``None``: never.
            Detached runs always keep going.
        checkpoint_dir: any fsspec URL (``s3://``, ``gs://``, ``file://``, ``sftp://``...); checkpoints go to
            ``<checkpoint_dir>/<run_name>/checkpoints`` unless ModelCheckpoint has its own ``dirpath``.
        storage_options: fsspec options for ``checkpoint_dir`` (endpoint, profile...).
        run_name: names the run under ``checkpoint_dir``; an existing name continues that run. Default: new.
        max_failures: restart the workers from the newest committed checkpoint up to this many times
            when a worker process or node dies.
        staging_dir: an fsspec URL where a cluster given only by address stages the run's payload and
            results (the model, its data, the trained weights); default ``<checkpoint_dir>/_staging``.
            Clusters reached over SSH and the embedded cluster need none.
        **ddp_kwargs: passed to :class:`~torch.nn.parallel.DistributedDataParallel`, as with ``DDPStrategy``.
    """

    strategy_name = "remote_gpu"

    def __init__(
        self,
        cluster: ClusterSpec = None,
        num_workers: int | None = None,
        use_gpu: bool | None = None,
        resources_per_worker: dict[str, float] | None = None,
        home_loggers: list[Any] | None = None,
        detach: bool = False,
        home_grace_s: float | None = 300.0,
        checkpoint_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
        run_name: str | None = None,
        max_failures: int = 0,
        staging_dir: str | None = None,
        process_group_backend: str | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(process_group_backend=process_group_backend, **ddp_kwargs)
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
            raise ConfigurationError(f"num_workers={num_workers!r}: give a positive whole number of workers.")
        if resources_per_worker is not None:
            bad = {k: v for k, v in resources_per_worker.items() if not isinstance(v, (int, float)) or v < 0}
            if bad:
                raise ConfigurationError(f"resources_per_worker has invalid amounts {bad}: use numbers >= 0, "
                                         'e.g. {"CPU": 2, "GPU": 1}.')
        self.cluster: ClusterSpec = cluster
        self.num_workers = num_workers
        self.use_gpu = use_gpu
        self.resources_per_worker = dict(resources_per_worker) if resources_per_worker else None
        if not isinstance(max_failures, int) or max_failures < 0:
            raise ConfigurationError(f"max_failures={max_failures!r}: give a whole number >= 0.")
        if max_failures and not checkpoint_dir:
            raise ConfigurationError("max_failures needs checkpoint_dir=<fsspec URL>: a restart resumes from "
                                     "the newest committed checkpoint there.")
        self.checkpoint_dir = checkpoint_dir
        if staging_dir is not None and (not isinstance(staging_dir, str) or not staging_dir.strip()):
            raise ConfigurationError(f"staging_dir={staging_dir!r}: give an fsspec URL, e.g. 's3://bucket/staging'.")
        self.staging_dir = staging_dir
        # Credentials reach the workers beside the run, never inside its pickle (gpu_proxy.secrets).
        self.storage_options = conceal(dict(storage_options)) if storage_options else None
        self.run_name = run_name
        self.max_failures = max_failures
        self.home_loggers = list(home_loggers or [])
        if home_grace_s is not None and home_grace_s < MIN_GRACE_S:
            raise ConfigurationError(f"home_grace_s={home_grace_s!r}: give at least {MIN_GRACE_S:g} seconds "
                                     "(home beats every few seconds), or None to never stop.")
        self.detach = detach
        self.home_grace_s = home_grace_s
        self.run_id: str | None = None
        self._worker_ctx: WorkerContext | None = None
        self._resolved_cluster: Cluster | None = None

    # ----- home side --------------------------------------------------------------------------
    def _configure_launcher(self) -> None:
        from gpu_proxy_lightning.launcher import RemoteLauncher

        self._launcher = RemoteLauncher(self)

    def resolved_cluster(self) -> Cluster:
        if self._resolved_cluster is None:
            self._resolved_cluster = resolve_cluster(self.cluster)
        return self._resolved_cluster

    def staging_url(self) -> str | None:
        """Where bulky run data is staged on a cluster given by address (see ``staging_dir``)."""
        if self.staging_dir:
            return self.staging_dir
        return f"{self.checkpoint_dir.rstrip('/')}/_staging" if self.checkpoint_dir else None

    def worker_count(self) -> int:
        return self.num_workers or max(1, self.num_processes) * max(1, self.num_nodes)

    def wants_gpu(self) -> bool:
        if self.use_gpu is not None:
            return self.use_gpu
        if self.resources_per_worker and self.resources_per_worker.get("GPU", 0) > 0:
            return True
        return isinstance(self.accelerator, (RemoteCUDAAccelerator, CUDAAccelerator))

    def worker_resources(self) -> dict[str, float]:
        resources = dict(self.resources_per_worker or {"CPU": 1.0})
        if self.wants_gpu():
            resources.setdefault("GPU", 1.0)
        elif resources.get("GPU", 0) > 0:
            raise ConfigurationError(
                f"use_gpu=False but resources_per_worker asks for {resources['GPU']} GPU per worker; "
                "drop one of the two.")
        return resources

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_resolved_cluster"] = None  # a live cluster handle (tunnels, tokens) never travels
        state["home_loggers"] = [object()] * len(self.home_loggers)  # they stay home; workers relay to them
        if isinstance(state.get("cluster"), Cluster):
            state["cluster"] = None
        return state

    # ----- worker side ------------------------------------------------------------------------
    def enter_worker(self, ctx: WorkerContext) -> None:
        """Turn the strategy shipped from home into rank ``ctx.rank`` of the run."""
        self._worker_ctx = ctx
        device = torch.device("cuda", 0) if ctx.use_gpu else torch.device("cpu")  # Ray masks the other GPUs
        self.accelerator = CUDAAccelerator() if ctx.use_gpu else CPUAccelerator()
        self.parallel_devices = [device] * ctx.placement.local_world_size
        self.num_nodes = ctx.num_nodes
        self.cluster_environment = RemoteWorkerEnvironment(ctx)
        self.set_world_ranks()

    @property
    def is_remote_worker(self) -> bool:
        return self._worker_ctx is not None

    @property
    def root_device(self) -> torch.device:
        if self._worker_ctx is None:
            return super().root_device
        return self.parallel_devices[self.local_rank]

    def set_world_ranks(self) -> None:
        if self._worker_ctx is None:
            return super().set_world_ranks()
        assert self.cluster_environment is not None
        self.cluster_environment.set_global_rank(self._worker_ctx.rank)
        self.cluster_environment.set_world_size(self._worker_ctx.world_size)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self._worker_ctx is None:
            return super().distributed_sampler_kwargs
        return {"num_replicas": self._worker_ctx.world_size, "rank": self.global_rank}


def register(registry: Any) -> None:
    if RemoteStrategy.strategy_name not in registry:
        registry.register(RemoteStrategy.strategy_name, RemoteStrategy,
                          description="DDP on a Ray cluster: local embedded, existing, or launched by gpu-proxy")


