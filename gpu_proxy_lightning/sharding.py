"""``RemoteStrategy(sharding=...)``: which Lightning strategy the workers train under, checked at home.

Home keeps one DDP-shaped ``RemoteStrategy`` (home never trains: it launches and takes in results).
The sharded strategy is built here, at home, from the user's arguments, so a bad argument fails in
``RemoteStrategy(...)``; it travels inside the RemoteStrategy and :func:`install` puts it in the
worker Trainer's place once the worker knows its rank.
"""
from __future__ import annotations

import inspect
from typing import Any

from lightning.pytorch.plugins.precision import DeepSpeedPrecision, FSDPPrecision, Precision
from lightning.pytorch.strategies import Strategy

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs import WorkerContext
from gpu_proxy_lightning.worker_strategies import (WorkerFSDPStrategy, WorkerModelParallelStrategy,
                                                   deepspeed_worker_class)

SHARDINGS = ("fsdp", "model_parallel", "deepspeed")
RETURN_WEIGHTS = (True, False, "auto")
_SHARDED_ONLY = {"auto_wrap_policy", "mixed_precision", "activation_checkpointing", "activation_checkpointing_policy",
                 "state_dict_type", "cpu_offload", "sharding_strategy", "device_mesh", "data_parallel_size",
                 "tensor_parallel_size", "save_distributed_checkpoint"}
HOME_MEMORY_SHARE = 0.8  # "auto" brings weights home when they take at most this share of free memory


def build(sharding: Any, process_group_backend: str | None, kwargs: dict[str, Any]) -> Strategy | None:
    """The workers' strategy for ``sharding`` (``None``: plain DDP, built by RemoteStrategy itself)."""
    if sharding is None:
        sharded_only = sorted(set(kwargs) & _SHARDED_ONLY)
        if sharded_only:  # they would reach DistributedDataParallel on the workers, and fail there
            raise ConfigurationError(f"RemoteStrategy({sharded_only[0]}=...) is an argument of sharded runs: add "
                                     "sharding=\"fsdp\" (or \"model_parallel\"), or drop it for DDP.")
        return None
    if sharding not in SHARDINGS:
        raise ConfigurationError(f"RemoteStrategy(sharding={sharding!r}): give one of "
                                 f"{', '.join(repr(s) for s in SHARDINGS)}, or None for DDP.")
    if sharding == "fsdp":
        _check_fsdp_kwargs(kwargs)
        return _construct(sharding, WorkerFSDPStrategy, process_group_backend, kwargs)
    if sharding == "model_parallel":
        return _construct(sharding, WorkerModelParallelStrategy, process_group_backend, kwargs)
    from lightning.fabric.strategies.deepspeed import _DEEPSPEED_AVAILABLE

    if not _DEEPSPEED_AVAILABLE:
        raise ConfigurationError('RemoteStrategy(sharding="deepspeed") needs the deepspeed package here and on '
                                 'the cluster: pip install deepspeed (Linux with CUDA).')
    return _construct(sharding, deepspeed_worker_class(), process_group_backend, kwargs)


def _construct(sharding: str, cls: type, process_group_backend: str | None, kwargs: dict[str, Any]) -> Strategy:
    try:
        return cls(process_group_backend=process_group_backend, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(f"RemoteStrategy(sharding={sharding!r}, ...): {error}. The other arguments go "
                                 f"to Lightning's {cls.__mro__[2].__name__}; see its documentation.") from error


def _check_fsdp_kwargs(kwargs: dict[str, Any]) -> None:
    """FSDPStrategy passes unknown arguments on to FSDP at wrap time, on the workers: catch typos here."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    known = set(inspect.signature(FSDPStrategy.__init__).parameters)
    known |= set(inspect.signature(FullyShardedDataParallel.__init__).parameters)
    unknown = sorted(set(kwargs) - known - {"accelerator", "parallel_devices", "cluster_environment"})
    if unknown:
        raise ConfigurationError(f"RemoteStrategy(sharding=\"fsdp\", {unknown[0]}=...): not an argument of "
                                 "Lightning's FSDPStrategy nor of torch's FullyShardedDataParallel. Check the "
                                 "spelling (e.g. auto_wrap_policy, mixed_precision, activation_checkpointing_policy, "
                                 "state_dict_type, cpu_offload).")
    from torch.distributed.fsdp import ShardingStrategy

    strategy = kwargs.get("sharding_strategy")
    if isinstance(strategy, str) and strategy.upper() not in ShardingStrategy.__members__:
        raise ConfigurationError(f"RemoteStrategy(sharding_strategy={strategy!r}): give one of "
                                 f"{', '.join(repr(m) for m in ShardingStrategy.__members__)}.")
    state_dict_type = kwargs.get("state_dict_type", "full")
    if state_dict_type not in ("full", "sharded"):
        raise ConfigurationError(f"RemoteStrategy(state_dict_type={state_dict_type!r}): give \"sharded\" (each rank "
                                 "writes its own shards) or \"full\" (rank 0 writes one plain file).")


def check_return_weights(value: Any) -> None:
    if not any(value is allowed or (isinstance(value, str) and value == allowed) for allowed in RETURN_WEIGHTS):
        raise ConfigurationError(f"RemoteStrategy(return_weights={value!r}): give True (bring the trained weights "
                                 "into the local model), False (leave them on the cluster; the checkpoint names "
                                 "them), or \"auto\" (only when they fit this machine's free memory).")


def home_memory_bytes() -> int | None:
    """How many bytes of weights home can take in now; None when it cannot be told."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available * HOME_MEMORY_SHARE)


def install(trainer: Any, remote: Any, ctx: WorkerContext) -> Strategy:
    """On a worker: make ``remote.sharded`` the Trainer's strategy, as rank ``ctx.rank`` of the run."""
    worker = remote.sharded
    worker.enter_worker(ctx, remote)
    worker.precision_plugin = _precision_for(worker, trainer, remote)
    worker.return_weights = remote.return_weights
    worker.home_memory_bytes = remote.home_memory_bytes
    trainer._accelerator_connector.strategy = worker
    return worker


def _precision_for(worker: Strategy, trainer: Any, remote: Any) -> Precision:
    """The precision plugin Lightning's connector would have chosen for this strategy (see
    ``_AcceleratorConnector._check_and_init_precision``): home chose one for DDP."""
    connector = trainer._accelerator_connector
    if isinstance(connector._precision_plugin_flag, Precision):
        return connector._precision_plugin_flag  # the user's own plugin, given through Trainer(plugins=...)
    if isinstance(worker, WorkerFSDPStrategy):
        return FSDPPrecision(connector._precision_flag)
    if isinstance(worker, WorkerModelParallelStrategy):
        return remote.precision_plugin  # Lightning picks the plain plugins for ModelParallelStrategy
    return DeepSpeedPrecision(connector._precision_flag)
