"""The strategies a sharded run's workers train under: Lightning's own, with the run's ranks and fsspec checkpoints.

Built at home by :mod:`gpu_proxy_lightning.sharding` (so the user's arguments are checked there),
shipped inside :class:`~gpu_proxy_lightning.RemoteStrategy`, and put in the worker Trainer's place
by :func:`gpu_proxy_lightning.sharding.install`. Lightning's FSDP and ModelParallel strategies
save sharded checkpoints through local ``pathlib`` paths only; here they go to any fsspec URL,
committed as one checkpoint (:mod:`gpu_proxy_lightning.sharded_checkpoints`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from typing_extensions import override

from gpu_proxy.runs import WorkerContext
from gpu_proxy_lightning import sharded_checkpoints


class _RunRanks:
    """Ranks come from the run (``WorkerContext``): nodes may hold different numbers of workers."""

    _worker_ctx: WorkerContext | None = None
    return_weights: bool | str = "auto"
    home_memory_bytes: int | None = None  # what home can take in; measured at home before the run

    def enter_worker(self, ctx: WorkerContext, remote: Any) -> None:
        """Take the devices, accelerator and environment ``remote`` set up for rank ``ctx.rank``."""
        self._worker_ctx = ctx
        self.parallel_devices = remote.parallel_devices
        self.accelerator = remote.accelerator
        self.num_nodes = ctx.num_nodes
        self.cluster_environment = remote.cluster_environment
        self.checkpoint_io = remote.checkpoint_io
        self._layer_sync = remote._layer_sync
        self._lightning_module = remote._lightning_module
        self.set_world_ranks()

    @override
    def set_world_ranks(self) -> None:
        if self._worker_ctx is None:
            return super().set_world_ranks()  # type: ignore[misc]
        self.cluster_environment.set_global_rank(self._worker_ctx.rank)
        self.cluster_environment.set_world_size(self._worker_ctx.world_size)
        rank_zero_only.rank = utils_rank_zero_only.rank = self._worker_ctx.rank

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self._worker_ctx is None:
            return super().distributed_sampler_kwargs  # type: ignore[misc]
        return {"num_replicas": self._worker_ctx.world_size, "rank": self._worker_ctx.rank}

    def wants_weights_home(self, full_bytes: int) -> bool:
        """Same answer on every rank (the size is global), so all join the gather or none does."""
        if self.return_weights == "auto":
            return self.home_memory_bytes is None or full_bytes <= self.home_memory_bytes
        return bool(self.return_weights)


def _global_bytes(state_dict: Mapping[str, Any]) -> int:
    """Bytes of the full (unsharded) tensors of a sharded state dict: shapes are global, nothing is gathered."""
    total = 0
    for tensor in state_dict.values():
        if not isinstance(tensor, torch.Tensor):
            continue
        metadata = getattr(tensor, "metadata", None)  # a ShardedTensor answers few tensor methods itself
        dtype = metadata().tensor_properties.dtype if callable(metadata) else tensor.dtype
        total += math.prod(tensor.size()) * dtype.itemsize
    return total


class WorkerFSDPStrategy(_RunRanks, FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1) on a run's worker."""

    def _full_state_dict_context(self, rank0_only: bool = True) -> Any:
        """Lightning's full-state-dict context, without ``offload_to_cpu`` when the devices are CPUs: torch
        2.13's FSDP segfaults cloning a CPU module's unsharded parameters "to the CPU" (checked on gloo)."""
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                    FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
                                    FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only))

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with self._full_state_dict_context():
            return self.model.state_dict()

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the real one
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard format, as Lightning's FSDPStrategy stores it
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    @override
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing

        if self.root_device.type != "cpu" or any(isinstance(m, FSDP) for m in model.modules()):
            return super()._setup_model(model)
        # On CPU (gloo) Lightning passes device_id=None (root_device.index), which torch 2.13's FSDP refuses
        # ("FSDP needs a non-CPU accelerator device") unless device_id names the CPU itself.
        model = FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                     sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        _save(self, checkpoint, filepath, storage_options, sharded=self._state_dict_type == "sharded")

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            sharded_checkpoints.remove(self, str(filepath))

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context

        url = self.broadcast(str(checkpoint_path))
        checkpoint = self.checkpoint_io.load_checkpoint(url, weights_only=weights_only)
        if not sharded_checkpoints.is_manifest(checkpoint):
            return self._load_full(checkpoint)
        options = sharded_checkpoints.storage_options_of(self)
        strict = self.lightning_module.strict_loading
        with _get_sharded_state_dict_context(self.model):
            module_state = {"model": self.model.state_dict()}
            dcp_load(module_state, storage_reader=sharded_checkpoints.reader(url, checkpoint, options))
            self.model.load_state_dict(module_state["model"], strict=strict)
            if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
                for index, optimizer in enumerate(self.optimizers):
                    key = f"optimizer_{index}"
                    state = load_sharded_optimizer_state_dict(
                        model_state_dict=module_state["model"], optimizer_key=key,
                        storage_reader=sharded_checkpoints.reader(url, checkpoint, options))
                    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(
                        optim_state_dict=state[key], model=self.model, optim=optimizer))
        checkpoint.pop(sharded_checkpoints.MANIFEST_KEY)
        return checkpoint

    def _load_full(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """A plain checkpoint (``state_dict_type="full"``, or a DDP run's): as Lightning's FSDP loads a file."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        with self._full_state_dict_context(rank0_only=False):
            self.model.load_state_dict(checkpoint.pop("state_dict"), strict=self.lightning_module.strict_loading)
            states = checkpoint.get("optimizer_states")
            if not states or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
                return checkpoint
            for optimizer, state in zip(self.optimizers, states):
                if isinstance(next(iter(state["state"]), None), int):  # keyed by parameter id: the standard format
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(
                    optim_state_dict=state, model=self.model, optim=optimizer))
        return checkpoint

    def weights_for_home(self) -> dict[str, torch.Tensor] | None:
        """Collective. Rank 0 gets the full state dict (on the CPU) when it should go home; others None."""
        from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context

        with _get_sharded_state_dict_context(self.model):
            full_bytes = _global_bytes(self.model.state_dict())
        if not self.wants_weights_home(full_bytes):
            return None
        with self._full_state_dict_context():
            state = self.model.state_dict()  # a collective: every rank calls it, rank 0 gets the tensors
            return {k: v.detach().cpu() for k, v in state.items()} if self.is_global_zero else None


def _save(strategy: Any, checkpoint: dict[str, Any], filepath: Any, storage_options: Any, sharded: bool) -> None:
    """Every rank its shards, committed as one checkpoint; or (not sharded) rank 0's gathered full state."""
    url = strategy.broadcast(str(filepath))
    if sharded:
        tensors = {"model": checkpoint.pop("state_dict"),
                   **{f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}}
        sharded_checkpoints.save(strategy, tensors, checkpoint, url)
    else:  # Lightning gathered the whole state on rank 0: a plain checkpoint
        Strategy.save_checkpoint(strategy, checkpoint, url, storage_options)
        strategy.barrier("gpu_proxy_full_checkpoint")


class WorkerModelParallelStrategy(_RunRanks, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (``fully_shard``/tensor parallel in ``configure_model``) on a worker."""

    # Its samplers follow the device mesh's data-parallel dimension (tensor-parallel peers read the same batch).
    distributed_sampler_kwargs = ModelParallelStrategy.distributed_sampler_kwargs

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        _save(self, checkpoint, filepath, storage_options, sharded=self._save_distributed_checkpoint)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            sharded_checkpoints.remove(self, str(filepath))

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        url = self.broadcast(str(checkpoint_path))
        checkpoint = self.checkpoint_io.load_checkpoint(url, weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if not sharded_checkpoints.is_manifest(checkpoint):
            full = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=strict)
            set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=full)
            for optimizer, state in zip(self.optimizers if fitting else [], checkpoint.get("optimizer_states", [])):
                set_optimizer_state_dict(self.model, optimizer, state, options=full)
            return checkpoint
        options = sharded_checkpoints.storage_options_of(self)
        module_state = {"model": get_model_state_dict(self.model)}
        dcp_load(module_state, storage_reader=sharded_checkpoints.reader(url, checkpoint, options))
        self.model.load_state_dict(module_state["model"], strict=strict)
        for index, optimizer in enumerate(self.optimizers if fitting else []):
            key = f"optimizer_{index}"
            state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp_load(state, storage_reader=sharded_checkpoints.reader(url, checkpoint, options))
            set_optimizer_state_dict(self.model, optimizer, state[key], options=StateDictOptions(cpu_offload=True))
        checkpoint.pop(sharded_checkpoints.MANIFEST_KEY)
        return checkpoint

    def weights_for_home(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_bytes = _global_bytes(get_model_state_dict(self.model))  # DTensors: global shapes
        if not self.wants_weights_home(full_bytes):
            return None
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_global_zero else None


def deepspeed_worker_class() -> type:
    """Built on demand: Lightning's ``DeepSpeedStrategy`` imports deepspeed when it is created."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    class WorkerDeepSpeedStrategy(_RunRanks, DeepSpeedStrategy):
        """Lightning's ``DeepSpeedStrategy`` on a worker. DeepSpeed writes its own checkpoint folders through
        local paths: give ModelCheckpoint a ``dirpath`` on storage every node mounts."""

        def weights_for_home(self) -> dict[str, torch.Tensor] | None:
            if self.zero_stage_3:
                return None  # ZeRO-3 weights are only whole in a consolidated checkpoint (zero_to_fp32)
            state = self.lightning_module.state_dict()
            return {k: v.detach().cpu() for k, v in state.items()} if self.is_global_zero else None

    return WorkerDeepSpeedStrategy
