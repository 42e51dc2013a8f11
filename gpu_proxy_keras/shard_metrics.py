"""``evaluate`` on several workers: each rank evaluates its shard, rank 0 combines the metric states.

Why states and not results: a mean of per-shard accuracies is wrong when shards differ in size,
and AUC or precision cannot be averaged at all. Keras metrics keep their state in variables that
declare how replicas combine (``Variable.aggregation``: ``"sum"`` for totals, counts and confusion
counts), which is what ``tf.distribute`` itself does with them. Rank 0 combines the states the same
way, loads them into its own metrics and reads the results, so ``evaluate`` returns what one worker
evaluating all the data returns (up to float summation order).
"""
from __future__ import annotations

import base64
from typing import Any

import keras
import numpy as np

from gpu_proxy_keras import rendezvous

# How long rank 0 waits for the slowest rank to finish its shard; a rank that dies ends the run anyway.
COLLECT_TIMEOUT_S = 24 * 3600.0
# How long a rank that finished first waits for rank 0 to listen (rank 0 may still be loading the model).
CONNECT_TIMEOUT_S = 600.0


class MergeShardMetrics(keras.callbacks.Callback):
    """On every rank of a sharded ``evaluate``, first in the callback list: rank 0 rewrites
    ``on_test_end``'s logs in place, so the user's callbacks and the event stream home see the
    combined ones. ``evaluate`` returns its
    own copy of the shard's logs, so rank 0's caller takes :meth:`result` instead."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, key: str) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.master_addr, self.master_port = master_addr, master_port  # see rendezvous.listen_address
        self._key = key  # the run's rendezvous key: never logged, never pickled (a gpu_proxy.secrets value)
        self._collector: rendezvous.Collector | None = None
        self.merged: dict[str, Any] | None = None

    def on_test_begin(self, logs: Any = None) -> None:
        if self.rank == 0:  # listen from the start: a rank with a quick shard may finish first
            self._collector = rendezvous.Collector(self.master_port, self.master_addr, self._key)

    def on_test_end(self, logs: Any = None) -> None:
        states = [[_encode(np.asarray(v)) for v in metric.variables] for metric in self.model.metrics]
        if self.rank != 0:
            # Rank 0 listens from its on_test_begin: only its start-up (model load) can keep us waiting.
            rendezvous.send_to_rank0(self.rank, states, self.master_addr, self.master_port, self._key,
                                     connect_timeout=CONNECT_TIMEOUT_S)
            return
        try:
            others = self._collector.collect(self.world_size - 1, timeout=COLLECT_TIMEOUT_S)
        finally:
            self.close()
        every_rank = [states] + [others[r] for r in range(1, self.world_size)]
        for index, metric in enumerate(self.model.metrics):
            for position, variable in enumerate(metric.variables):
                parts = [_decode(rank_states[index][position]) for rank_states in every_rank]
                variable.assign(_combine(variable, parts, metric.name))
        merged = {key: _plain(value) for key, value in self.model.get_metrics_result().items()}
        if logs is not None and set(logs) != set(merged):
            raise ValueError(
                f"evaluate on {self.world_size} workers combines the model's metric states, but this "
                f"model's test_step reports {sorted(logs)} instead of its metrics {sorted(merged)}. "
                "Use RemoteFit(num_workers=1) for evaluate with a custom test_step.")
        if logs is not None:
            logs.update(merged)
        self.merged = merged

    def close(self) -> None:
        """Free the rendezvous port; the worker calls it however evaluate ended (pooled processes live on)."""
        if self._collector is not None:
            self._collector.close()
            self._collector = None

    def result(self, model: Any, return_dict: bool) -> Any:
        """What Keras' ``evaluate`` returns, from the combined metrics (rank 0)."""
        if return_dict:
            return dict(self.merged)
        return model._flatten_metrics_in_order(self.merged)  # Keras' own list order (keras pinned)


def _combine(variable: Any, parts: list[np.ndarray], metric_name: str) -> np.ndarray:
    aggregation = getattr(variable, "aggregation", "sum")
    if aggregation == "sum":
        return np.sum(parts, axis=0).astype(parts[0].dtype)
    if aggregation == "only_first_replica":
        return parts[0]
    raise ValueError(
        f"the metric {metric_name!r} keeps its state in a variable with aggregation={aggregation!r}, "
        "so its per-shard states cannot be combined exactly (shards differ in size). Give the variable "
        "aggregation='sum' (Keras' default for metrics), or use RemoteFit(num_workers=1) for evaluate.")


def _encode(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": array.dtype.str, "shape": list(array.shape),
            "data": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()}


def _decode(encoded: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(encoded["data"]), np.dtype(encoded["dtype"])).reshape(encoded["shape"])


def _plain(value: Any) -> Any:
    array = np.asarray(value)
    return float(array) if array.ndim == 0 else array
