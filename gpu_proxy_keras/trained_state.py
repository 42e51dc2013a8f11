"""What a trained model sends home, and how the local model takes it in: weights and optimizer state.

Plain numpy arrays in Keras' own variable order, so home needs no file format and no temp path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class TrainedState:
    weights: list[np.ndarray]
    optimizer_variables: list[np.ndarray]
    build_config: dict[str, Any] | None


def capture(model: Any) -> TrainedState:
    optimizer = getattr(model, "optimizer", None)
    optimizer_variables = [np.array(v) for v in optimizer.variables] if optimizer is not None else []
    return TrainedState(weights=[np.array(w) for w in model.get_weights()],
                        optimizer_variables=optimizer_variables,
                        build_config=model.get_build_config())


def restore(model: Any, state: TrainedState) -> None:
    """Make the local model hold the trained weights and optimizer state."""
    if not model.built and state.build_config:
        model.build_from_config(state.build_config)  # a subclassed model first built remotely
    model.set_weights(state.weights)
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
