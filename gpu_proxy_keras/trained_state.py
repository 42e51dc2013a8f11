"""What a worker's model sends home, and how the local model takes it in: weights, optimizer state
and metric state.

Plain numpy arrays in Keras' own variable order, so home needs no file format and no temp path.
Metric variables (the loss tracker's and compiled metrics' totals and counts) travel by their
``path``: locally ``evaluate`` leaves them holding the evaluation (``model.get_metrics_result()``),
and a model whose compiled metrics were never run has none yet at home.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TrainedState:
    weights: list[np.ndarray] | None  # None: unchanged by the run (evaluate/predict), nothing to send
    optimizer_variables: list[np.ndarray]
    build_config: dict[str, Any] | None
    metric_variables: dict[str, np.ndarray] = field(default_factory=dict)  # by Variable.path


def weights_of(model: Any) -> list[np.ndarray] | None:
    """The weights before an evaluate/predict, to tell afterwards whether it changed any (None: unbuilt)."""
    return [np.array(w) for w in model.get_weights()] if model.built else None


def capture(model: Any, optimizer: bool = True, unchanged_from: list[np.ndarray] | None = None) -> TrainedState:
    """``optimizer=False`` for evaluate/predict: they never change it (and may run uncompiled).

    With ``unchanged_from`` (the weights before evaluate/predict) the weights are sent only when the
    run changed one (e.g. a counter that ``predict_step`` updates): usually they stay on the worker."""
    model_optimizer = getattr(model, "optimizer", None) if optimizer else None
    optimizer_variables = [np.array(v) for v in model_optimizer.variables] if model_optimizer is not None else []
    weights = [np.array(w) for w in model.get_weights()]
    if unchanged_from is not None and len(unchanged_from) == len(weights) and all(
            np.array_equal(a, b) for a, b in zip(unchanged_from, weights)):
        weights = None
    return TrainedState(weights=weights,
                        optimizer_variables=optimizer_variables,
                        build_config=_plain_config(model.get_build_config()),
                        metric_variables={v.path: np.array(v) for v in model.metrics_variables})


def _plain_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The build config as plain JSON data, as a .keras archive holds it: Keras' own tracked lists in
    it (a subclassed model's input shape) cannot be unpickled outside a layer."""
    return None if config is None else json.loads(json.dumps(config))


def restore(model: Any, state: TrainedState, data_batch: Any = None) -> None:
    """Make the local model hold the worker's weights, optimizer state and metric state.

    ``data_batch`` (``(x, y, sample_weight)`` arrays of a few samples, or None) builds compiled
    metrics that the local model never ran, so that their state has somewhere to go."""
    if not model.built and state.build_config:
        model.build_from_config(state.build_config)  # a subclassed model first built remotely
    if state.weights is not None:
        model.set_weights(state.weights)
    _restore_metrics(model, state.metric_variables, data_batch)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not state.optimizer_variables:
        return
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    if len(optimizer.variables) != len(state.optimizer_variables):
        raise RuntimeError(
            f"the local optimizer has {len(optimizer.variables)} variables but the trained one has "
            f"{len(state.optimizer_variables)}; was the model recompiled during the run?")
    for variable, value in zip(optimizer.variables, state.optimizer_variables):
        variable.assign(value)


def _restore_metrics(model: Any, values: dict[str, np.ndarray], data_batch: Any) -> None:
    if not values:
        return
    local = {v.path: v for v in model.metrics_variables}
    if set(values) - set(local) and data_batch is not None:
        # Keras builds compiled metrics on their first use (it picks e.g. which "accuracy" from the
        # shapes). Its own evaluate does that with this symbolic build (no computation) from a batch;
        # private, Keras pinned.
        try:
            model._symbolic_build(data_batch=data_batch)
        except Exception:  # noqa: BLE001 - a metric home cannot build keeps home's (unbuilt) state
            pass
        local = {v.path: v for v in model.metrics_variables}
    for path, value in values.items():
        variable = local.get(path)
        # A metric home cannot build (data only the workers read) keeps its state; shapes must agree.
        if variable is not None and tuple(variable.shape) == value.shape:
            variable.assign(value)
