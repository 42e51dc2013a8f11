"""Gather ``predict`` outputs from every worker into what a local ``predict`` returns.

Each rank predicts its shard of the dataset; Lightning records the dataset index of every
sample. Home splits each batch's output into samples, puts each dataset index once in order
(dropping any sample a sampler repeated to pad its shard), and re-batches at the original batch
size, so the list equals a single-process run's.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionRecorder(BasePredictionWriter):
    """Added on the workers for ``predict``: keeps each rank's outputs with their dataset indices."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.recorded: tuple[list[list[Any]], list[list[list[int]]]] | None = None

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        loop = trainer.predict_loop
        self.recorded = ([list(p) for p in loop._predictions], [list(b) for b in loop.epoch_batch_indices])


def _split(output: Any, size: int) -> list[Any] | None:
    """One item per sample, or None when ``output`` is not batch-shaped."""
    if isinstance(output, torch.Tensor):
        return list(output) if output.dim() > 0 and output.shape[0] == size else None
    if isinstance(output, dict):
        parts = {k: _split(v, size) for k, v in output.items()}
        if any(p is None for p in parts.values()):
            return None
        return [type(output)({k: parts[k][i] for k in output}) for i in range(size)]
    if isinstance(output, (list, tuple)) and output:
        parts = [_split(v, size) for v in output]
        if any(p is None for p in parts):
            return None
        return [type(output)(p[i] for p in parts) for i in range(size)]
    return None


def _combine(samples: list[Any]) -> Any:
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(samples)
    if isinstance(first, dict):
        return type(first)({k: _combine([s[k] for s in samples]) for k in first})
    return type(first)(_combine([s[i] for s in samples]) for i in range(len(first)))


def _merge_dataloader(per_rank: list[tuple[list[Any], list[list[int]]]]) -> list[Any]:
    by_index: dict[int, Any] = {}
    batch_size = 0
    for outputs, indices in per_rank:
        if len(outputs) != len(indices):
            raise ValueError("batch indices unknown (not a DataLoader)")
        for output, batch_indices in zip(outputs, indices):
            batch_size = max(batch_size, len(batch_indices))
            samples = _split(output, len(batch_indices))
            if samples is None:
                raise ValueError("not batch-shaped")
            for index, sample in zip(batch_indices, samples):
                by_index.setdefault(index, sample)
    ordered = [by_index[i] for i in sorted(by_index)]
    return [_combine(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]


def merge(outputs: list[Any]) -> Any:
    """``outputs``: each rank's WorkerOutput, in rank order. Returns what ``trainer.predict`` returns."""
    num_dataloaders = len(outputs[0].predictions or [])
    merged = []
    for dl in range(num_dataloaders):
        per_rank = [(o.predictions[dl], o.batch_indices[dl]) for o in outputs]
        try:
            merged.append(_merge_dataloader(per_rank))
        except (ValueError, IndexError, RuntimeError):
            warnings.warn("predict outputs are not tensors (or dicts/tuples of tensors) with one row per "
                          "sample, so they cannot be put back in dataset order; returning them rank by rank.")
            merged.append([batch for outputs_, _ in per_rank for batch in outputs_])
    return merged[0] if num_dataloaders == 1 else merged
