"""What a worker's Trainer sends home after a run, and how home takes it in.

Rank 0 sends the state a local run would leave behind: weights, ``trainer.state``, the three
metric dicts, loop progress (``current_epoch``, ``global_step``), and the plain-data attributes
of every callback (``best_model_path``, ``best_model_score``, early-stopping counters...). Every
rank sends its predictions with their dataset indices, since ``predict`` gathers all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerState
from lightning_utilities.core.apply_func import apply_to_collection

from gpu_proxy_lightning.home_callbacks import HomeCallback



_PLAIN = (type(None), bool, int, float, str, bytes, PurePath, torch.Tensor)


@dataclass
class WorkerOutput:
    rank: int
    trainer_state: TrainerState | None = None
    trainer_results: Any = None
    weights: dict[str, torch.Tensor] | None = None  # rank 0's state dict, on the CPU
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    fit_loop_state: dict[str, Any] | None = None
    callback_attributes: dict[int, dict[str, Any]] = field(default_factory=dict)
    interrupted: bool = False  # stopped at home's request (Ctrl-C)
    returns_predictions: bool = False  # predict(return_predictions=True) on the worker
    predictions: list[list[Any]] | None = None  # per dataloader, per batch
    batch_indices: list[list[list[int]]] | None = None  # per dataloader, per batch, per sample


def _is_plain(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if depth > 3:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _to_cpu(value: Any) -> Any:
    return apply_to_collection(value, torch.Tensor, lambda t: t.detach().cpu())


def collect(trainer: Any, results: Any, rank: int, predictions: Any = None) -> WorkerOutput:
    """Called on every worker after the Trainer function returned."""
    output = WorkerOutput(rank=rank)
    if predictions is not None:
        output.predictions, output.batch_indices = predictions
        output.returns_predictions = results is not None
        results = None  # the predictions travel once, with their indices
    state_dict = _weights_for_home(trainer)
    if rank != 0:
        return output
    output.trainer_state = trainer.state
    output.trainer_results = _to_cpu(results)
    if state_dict is not None:
        output.weights = _to_cpu(state_dict)
    connector = trainer._logger_connector
    output.metrics = {
        "callback": _to_cpu(dict(connector.callback_metrics)),
        "logged": _to_cpu(dict(connector.logged_metrics)),
        "progress_bar": _to_cpu(dict(connector.progress_bar_metrics)),
    }
    if trainer.state.fn == TrainerFn.FITTING:
        output.fit_loop_state = trainer.fit_loop.state_dict()
    for index, callback in enumerate(trainer.callbacks):
        if isinstance(callback, HomeCallback):  # a shell here; its state is the wrapped callback's, at home
            continue
        output.callback_attributes[index] = {
            key: _to_cpu(value) for key, value in vars(callback).items() if _is_plain(value)}
    return output


def _weights_for_home(trainer: Any) -> dict[str, Any] | None:
    """Rank 0's full state dict after fit, or None. A collective: every rank calls it."""
    if trainer.state.fn != TrainerFn.FITTING or getattr(trainer.strategy, "return_weights", True) is False:
        return None
    sharded = getattr(trainer.strategy, "weights_for_home", None)  # sharded runs gather their shards
    if sharded is not None:
        return sharded()
    # Every rank must compute the state dict: torchmetrics Metrics sync inside state_dict().
    return trainer.lightning_module.state_dict()


def _build_layers_made_on_workers(module: torch.nn.Module, weights: dict[str, Any]) -> bool:
    """A model whose layers ``configure_model`` made on the workers never had them here: make them, on the
    meta device (no memory), so the arriving weights become them. True if it did."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if set(weights) <= set(module.state_dict()) or not is_overridden("configure_model", module):
        return False
    with torch.device("meta"):
        module.configure_model()
    return True


def _has_tied_parameters(module: torch.nn.Module) -> bool:
    tensors = [t for _, t in (*module.named_parameters(remove_duplicate=False),
                              *module.named_buffers(remove_duplicate=False))]
    return len({id(t) for t in tensors}) != len(tensors)


def restore(trainer: Any, output: WorkerOutput) -> None:
    """Make the home Trainer look as rank 0's did at the end of the run."""
    if output.weights is not None:
        module = trainer.lightning_module
        built_on_meta = _build_layers_made_on_workers(module, output.weights)
        # strict=False, as Lightning's own spawn launcher: a module may add layers in setup hooks.
        # assign=True takes the arrived tensors (mapped from the result file) as the parameters, so
        # home holds no second copy; tied parameters are copied into instead, to stay one Parameter.
        module.load_state_dict(output.weights, strict=False,
                               assign=built_on_meta or not _has_tied_parameters(module))
    if output.trainer_state is not None:
        trainer.state = output.trainer_state
    connector = trainer._logger_connector
    connector._callback_metrics = dict(output.metrics.get("callback", {}))
    connector._logged_metrics = dict(output.metrics.get("logged", {}))
    connector._progress_bar_metrics = dict(output.metrics.get("progress_bar", {}))
    if output.fit_loop_state is not None:
        trainer.fit_loop.load_state_dict(output.fit_loop_state)
    # Callbacks are matched by position: the same Trainer object built the same list on the worker
    # (the Trainer may add its own callbacks, but does so identically on both sides).
    for index, callback in enumerate(trainer.callbacks):
        for key, value in output.callback_attributes.get(index, {}).items():
            setattr(callback, key, value)
