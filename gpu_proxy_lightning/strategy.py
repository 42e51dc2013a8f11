"""``RemoteStrategy``: Lightning's DDP (or FSDP, ModelParallel, DeepSpeed), on a Ray cluster instead of this machine."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Generator, Literal

from typing_extensions import override

import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

from gpu_proxy.clusters.base import Cluster
from gpu_proxy.clusters.resolve import ClusterSpec, check_cluster_spec, resolve_cluster, start_early
from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs import WorkerContext
from gpu_proxy.runs.heartbeat import MIN_GRACE_S
from gpu_proxy.runs.pool import check_keep_warm
from gpu_proxy.runs.resources import per_worker_resources
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.secrets import conceal
from gpu_proxy_lightning import sharding as sharding_
from gpu_proxy_lightning.checkpointing import check_run_name
from gpu_proxy_lightning.environment import RemoteWorkerEnvironment
from gpu_proxy_lightning.remote_accelerator import RemoteCUDAAccelerator


#: The warm-worker pool of Lightning runs, and what its processes import before a first run.
WORKER_POOL = "lightning"
WORKER_MODULES = ("torch", "lightning.pytorch", "gpu_proxy_lightning")


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
        keep_warm: seconds the run's worker processes stay warm for the next run of their kind (default
            600; ``0``: they end with the run); idle ones give way to any run that needs their resources.
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
        sharding: ``None`` for DDP; ``"fsdp"`` (Lightning's ``FSDPStrategy``), ``"model_parallel"``
            (``ModelParallelStrategy``: ``fully_shard``/tensor parallel in ``configure_model``) or
            ``"deepspeed"`` (``DeepSpeedStrategy``) for models that do not fit one GPU. See docs/lightning.md,
            "Large models".
        return_weights: for sharded runs, whether the trained full weights come into the local model:
            ``True``, ``False`` (they stay in the run's checkpoints), or ``"auto"``: only when they fit this
            machine's free memory. DDP runs always bring them home unless this is ``False``.
        **strategy_kwargs: with ``sharding``, passed to that Lightning strategy (``auto_wrap_policy``,
            ``mixed_precision``, ``activation_checkpointing_policy``, ``state_dict_type``, ``cpu_offload``...);
            without, passed to :class:`~torch.nn.parallel.DistributedDataParallel`, as with ``DDPStrategy``.
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
        sharding: Literal["fsdp", "model_parallel", "deepspeed"] | None = None,
        return_weights: bool | Literal["auto"] = "auto",
        keep_warm: float = 600.0,
        **strategy_kwargs: Any,
    ) -> None:
        # Every argument is checked here, before the Trainer exists and long before any worker starts.
        _check_arguments(cluster=cluster, num_workers=num_workers, use_gpu=use_gpu,
                         resources_per_worker=resources_per_worker, detach=detach, home_grace_s=home_grace_s,
                         checkpoint_dir=checkpoint_dir, storage_options=storage_options, run_name=run_name,
                         max_failures=max_failures, process_group_backend=process_group_backend)
        home_loggers = _checked_loggers(home_loggers)
        check_cluster_spec(cluster)  # an unknown name fails now, not at the first fit
        sharding_.check_return_weights(return_weights)
        # The workers' own strategy, built here so that its arguments are checked now (None for DDP).
        self.sharded = sharding_.build(sharding, process_group_backend, strategy_kwargs)
        super().__init__(process_group_backend=process_group_backend, **({} if sharding else strategy_kwargs))
        self.sharding = sharding
        self.return_weights = return_weights
        self.home_memory_bytes: int | None = None  # measured at each launch, for return_weights="auto"
        self.weights_url: str | None = None  # where the weights are when they stayed on the cluster
        self.cluster: ClusterSpec = cluster
        self.num_workers = num_workers
        self.use_gpu = use_gpu
        self.resources_per_worker = dict(resources_per_worker) if resources_per_worker else None
        if max_failures and not checkpoint_dir:
            raise ConfigurationError("max_failures needs checkpoint_dir=<fsspec URL>: a restart resumes from "
                                     "the newest committed checkpoint there.")
        self.checkpoint_dir = os.fspath(checkpoint_dir) if checkpoint_dir is not None else None
        if staging_dir is not None and (not isinstance(staging_dir, str) or not staging_dir.strip()):
            raise ConfigurationError(f"staging_dir={staging_dir!r}: give an fsspec URL, e.g. 's3://bucket/staging'.")
        self.staging_dir = staging_dir
        # Credentials reach the workers beside the run, never inside its pickle (gpu_proxy.secrets).
        self.storage_options = conceal(dict(storage_options)) if storage_options else None
        self.run_name = run_name
        self.max_failures = max_failures
        self.home_loggers = home_loggers
        self.detach = detach
        self.home_grace_s = home_grace_s
        self.keep_warm = check_keep_warm(keep_warm, "RemoteStrategy")
        self.run_id: str | None = None
        self._worker_ctx: WorkerContext | None = None
        self._resolved_cluster: Cluster | None = None
        start_early(cluster)  # the embedded cluster starts while the script builds its model and data

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Put ``"remote_gpu"`` (DDP) and ``"remote_fsdp"`` in Lightning's registry, as Lightning's own
        strategies register themselves; ``import gpu_proxy_lightning`` calls it."""
        for name, arguments in STRATEGY_NAMES.items():
            if name not in strategy_registry:
                what = "FSDP" if arguments else "DDP"
                strategy_registry.register(name, cls, **arguments, description=(
                    f"{what} on a Ray cluster: local embedded, existing, or launched by gpu-proxy"))

    # ----- home side --------------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        # The Trainer calls this once it has set the accelerator, devices and num_nodes on the strategy:
        # the first moment the settings can be checked against each other, still inside Trainer(...).
        from gpu_proxy_lightning.launcher import RemoteLauncher

        self._check_gpu_settings()
        self._reconcile_world_size()
        self._launcher = RemoteLauncher(self)
        if not self.detach and self.keep_warm > 0:
            # Devices are known now: the embedded cluster's workers start and import torch and
            # Lightning while the script goes on to fit (a detached run gets its own on the cluster).
            start_early(self.cluster, RunSpec(payload=None, num_workers=self.worker_count(),
                                              resources_per_worker=self.worker_resources(),
                                              worker_pool=WORKER_POOL, keep_warm_s=self.keep_warm),
                        modules=WORKER_MODULES)

    @contextlib.contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``trainer.init_module(empty_init=True)`` at home, for a sharded run: the model is built on the meta
        device, so home holds no weights and the model ships as its recipe; the workers materialize it."""
        if self.sharding not in ("fsdp", "model_parallel") or not empty_init:  # DeepSpeed has its own (zero.Init)
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():  # e.g. bf16-true's dtype
            yield

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

    def _accelerator_is_gpu(self) -> bool | None:
        """True/False once the Trainer has set the accelerator; None before."""
        accelerator = self._accelerator
        if accelerator is None:
            return None
        return isinstance(accelerator, (RemoteCUDAAccelerator, CUDAAccelerator))

    def wants_gpu(self) -> bool:
        """Whether each worker gets a GPU: exactly what :meth:`worker_resources` asks Ray for."""
        return self.worker_resources().get("GPU", 0) > 0

    def worker_resources(self) -> dict[str, float]:
        gpu = self.use_gpu or (self.use_gpu is None and self._accelerator_is_gpu())
        return per_worker_resources(self.resources_per_worker, bool(gpu))

    def _check_gpu_settings(self) -> None:
        """Refuse a Trainer accelerator that contradicts use_gpu / resources_per_worker (see __init__)."""
        on_gpu = self._accelerator_is_gpu()
        asked = self.resources_per_worker.get("GPU") if self.resources_per_worker else None
        name = type(self._accelerator).__name__
        if on_gpu and (self.use_gpu is False or asked == 0):
            setting = "use_gpu=False" if self.use_gpu is False else 'resources_per_worker={"GPU": 0}'
            raise ConfigurationError(
                f"Trainer(accelerator=...) chose GPUs ({name}) but RemoteStrategy has {setting}: the workers "
                "would get no GPU. Use accelerator=\"cpu\", or drop that setting.")
        if self.sharding == "deepspeed" and not self.wants_gpu():
            raise ConfigurationError('RemoteStrategy(sharding="deepspeed") trains on CUDA GPUs only (Lightning\'s '
                                     'DeepSpeedStrategy): pass Trainer(accelerator="gpu"), or use sharding="fsdp".')
        if on_gpu is False and (self.use_gpu or (asked or 0) > 0):
            setting = "use_gpu=True" if self.use_gpu else f'resources_per_worker={{"GPU": {asked}}}'
            raise ConfigurationError(
                f"RemoteStrategy has {setting} but the Trainer's accelerator is {name}: the workers would hold "
                "GPUs and train on their CPUs. Pass Trainer(accelerator=\"gpu\"), or drop that setting.")

    def _reconcile_world_size(self) -> None:
        """``num_workers`` wins over ``devices x num_nodes``, so the home Trainer reports the run's world size."""
        if self.num_workers is None or self.parallel_devices is None:
            return
        nodes = max(1, self.num_nodes)
        if self.num_workers % nodes:
            raise ConfigurationError(
                f"RemoteStrategy(num_workers={self.num_workers}) with Trainer(num_nodes={nodes}): give a "
                "multiple of num_nodes, or drop num_workers and set devices per node.")
        per_node = self.num_workers // nodes
        if per_node == len(self.parallel_devices):
            return
        if len(self.parallel_devices) > 1:  # devices="auto" gives 1; more was asked for explicitly
            rank_zero_warn(f"RemoteStrategy(num_workers={self.num_workers}) overrides Trainer(devices="
                           f"{len(self.parallel_devices)}, num_nodes={nodes}): the run has {self.num_workers} "
                           "workers, and the Trainer reports that world size.")
        first = self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")
        self.parallel_devices = ([torch.device("cuda", i) for i in range(per_node)] if first.type == "cuda"
                                 else [first] * per_node)
        self.set_world_ranks()

    @override
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
        local = ctx.placement.local_world_size
        if ctx.use_gpu:
            # The core made every GPU of the run on this node visible, in local-rank order
            # (gpu_proxy/runs/worker.py): rank i's own is cuda:i, as under Lightning's own DDP.
            per_worker = max(1, len(os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")) // local)
            self.parallel_devices = [torch.device("cuda", i * per_worker) for i in range(local)]
        else:
            self.parallel_devices = [torch.device("cpu")] * local
        self.accelerator = CUDAAccelerator() if ctx.use_gpu else CPUAccelerator()
        self.num_nodes = ctx.num_nodes
        self.cluster_environment = RemoteWorkerEnvironment(ctx)
        self.set_world_ranks()
        if ctx.world_size == 1:
            self._skip_one_rank_broadcasts()

    def _skip_one_rank_broadcasts(self) -> None:
        """A one-worker run has nobody to broadcast to, but DDP still copies the whole state through
        gloo at wrap time and every buffer at each forward: 2 GB of state cost ~8 s a fit. Lightning's
        own one-device run has no DDP at all. The user's explicit DDP arguments win."""
        self._ddp_kwargs.setdefault("init_sync", False)
        if "broadcast_buffers" not in self._ddp_kwargs:
            self._ddp_kwargs.setdefault("forward_sync_buffers", False)

    @property
    def is_remote_worker(self) -> bool:
        return self._worker_ctx is not None

    @property
    @override
    def root_device(self) -> torch.device:
        if self._worker_ctx is None:
            return super().root_device
        return self.parallel_devices[self.local_rank]

    @override
    def set_world_ranks(self) -> None:
        if self._worker_ctx is None:
            return super().set_world_ranks()
        assert self.cluster_environment is not None
        self.cluster_environment.set_global_rank(self._worker_ctx.rank)
        self.cluster_environment.set_world_size(self._worker_ctx.world_size)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self._worker_ctx is None:
            return super().distributed_sampler_kwargs
        return {"num_replicas": self._worker_ctx.world_size, "rank": self.global_rank}

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _bad(name: str, value: Any, fix: str) -> ConfigurationError:
    return ConfigurationError(f"RemoteStrategy({name}={value!r}): {fix}")


def _check_arguments(*, cluster: Any, num_workers: Any, use_gpu: Any, resources_per_worker: Any, detach: Any,
                     home_grace_s: Any, checkpoint_dir: Any, storage_options: Any, run_name: Any,
                     max_failures: Any, process_group_backend: Any) -> None:
    """Raise :class:`ConfigurationError` naming the first argument of the wrong type or value, and the fix."""
    if cluster is not None and not isinstance(cluster, (str, Cluster)):
        raise _bad("cluster", cluster, 'give None (embedded), a dashboard address "http://host:8265", a saved '
                                       "cluster name, or a gpu_proxy cluster object.")
    if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                    or num_workers < 1):
        raise _bad("num_workers", num_workers, "give a positive whole number of workers, or None for "
                                               "devices x num_nodes.")
    if use_gpu is not None and not isinstance(use_gpu, bool):
        raise _bad("use_gpu", use_gpu, "give True, False, or None (follow the Trainer's accelerator).")
    if resources_per_worker is not None:
        if not isinstance(resources_per_worker, dict):
            raise _bad("resources_per_worker", resources_per_worker, 'give a dict of Ray resources, e.g. '
                                                                     '{"CPU": 2, "GPU": 1}.')
        bad = {k: v for k, v in resources_per_worker.items()
               if not isinstance(k, str) or not _is_number(v) or v < 0 or math.isinf(v)}
        if bad:
            raise _bad("resources_per_worker", resources_per_worker,
                       f"invalid entries {bad}: give resource names with amounts >= 0, e.g. "
                       '{"CPU": 2, "GPU": 1}.')
        gpus = resources_per_worker.get("GPU")
        if use_gpu is False and gpus:
            raise ConfigurationError(f'RemoteStrategy(use_gpu=False, resources_per_worker={{"GPU": {gpus!r}}}): '
                                     "these contradict each other; drop one of the two.")
        if use_gpu is True and gpus == 0:
            raise ConfigurationError('RemoteStrategy(use_gpu=True, resources_per_worker={"GPU": 0}): these '
                                     "contradict each other; drop one of the two.")
    if not isinstance(detach, bool):
        raise _bad("detach", detach, "give True or False.")
    if home_grace_s is not None and (not _is_number(home_grace_s) or home_grace_s < MIN_GRACE_S):
        raise _bad("home_grace_s", home_grace_s, f"give seconds as a number >= {MIN_GRACE_S:g} (home beats "
                                                 "every few seconds), e.g. 300, or None to never stop.")
    if checkpoint_dir is not None and (not isinstance(checkpoint_dir, (str, os.PathLike)) or not str(checkpoint_dir)):
        raise _bad("checkpoint_dir", checkpoint_dir, 'give an fsspec URL string, e.g. "s3://bucket/runs" or '
                                                     '"/data/runs".')
    if storage_options is not None and (not isinstance(storage_options, dict)
                                        or not all(isinstance(k, str) for k in storage_options)):
        raise _bad("storage_options", storage_options, 'give a dict of fsspec options, e.g. {"profile": "lab"} '
                                                       'or {"key": ..., "secret": ...}.')
    if run_name is not None:
        check_run_name(run_name, "RemoteStrategy")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise _bad("max_failures", max_failures, "give a whole number >= 0 of restarts, e.g. 2.")
    if process_group_backend is not None and not isinstance(process_group_backend, str):
        raise _bad("process_group_backend", process_group_backend, 'give "nccl", "gloo", or None.')


def _checked_loggers(home_loggers: Any) -> list[Any]:
    """Home loggers must be Lightning Loggers: they are called here for the whole run."""
    if home_loggers is None:
        return []
    if isinstance(home_loggers, Logger):
        return [home_loggers]
    if not isinstance(home_loggers, (list, tuple)):
        raise _bad("home_loggers", home_loggers, "give a list of Lightning loggers, e.g. [CSVLogger(\"logs\")].")
    bad = [lg for lg in home_loggers if not isinstance(lg, Logger)]
    if bad:
        raise _bad("home_loggers", home_loggers, f"{bad[0]!r} is not a Lightning Logger; give loggers from "
                                                 "lightning.pytorch.loggers (CSVLogger, TensorBoardLogger...) or "
                                                 "subclasses of Logger.")
    return list(home_loggers)


# Names for Trainer(strategy=...), with the RemoteStrategy arguments each stands for.
STRATEGY_NAMES: dict[str, dict[str, Any]] = {RemoteStrategy.strategy_name: {}, "remote_fsdp": {"sharding": "fsdp"}}


