"""The payload every worker calls: rebuild the model, run the Keras method, send rank 0's result home.

This module imports no Keras at import time: the backend must be chosen (``KERAS_BACKEND``) before
``keras`` is first imported, and a multi-worker TensorFlow run must start in a fresh process
(see ``fresh_process.py``). For the same reason the user's objects (callbacks, data, custom
objects) travel as bytes inside the job and are unpickled only once the backend is set.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from gpu_proxy_keras import distribution, rendezvous


@dataclass
class KerasJob:
    method: str  # "fit", "evaluate" or "predict"
    backend: str
    #: The model's .keras archive (architecture, weights, compile, optimizer state): bytes, or a uint8
    #: array so that it travels out of band, uncopied.
    model_archive: Any
    user_objects: Any  # a gpu_proxy.dataplane Package of {"custom_objects", "callbacks", "data", "kwargs"}
    checkpoint: dict[str, Any] | None = None  # EpochCheckpoint's arguments (rank 0), see epoch_checkpoint.py
    # For data given as file URLs. A field of the job, not inside user_objects: credentials in it are
    # gpu_proxy.secrets values, which travel beside a pickle only when that pickle holds them directly.
    storage_options: dict[str, Any] | None = None
    batch_events: bool = True  # forward every batch's end home (progress bar, home batch hooks)
    sharded: bool = False  # evaluate/predict: each rank takes its shard of the data (data_sources.py)
    #: Signs the ranks' rendezvous messages (rendezvous.py). A gpu_proxy.secrets value, new per run: a
    #: field of the job itself, so that it travels beside the pickle, never in it.
    rendezvous_key: str = ""

    @property
    def trains_together(self) -> bool:
        """Whether the ranks form one distributed training (fit); sharded ranks work independently."""
        return self.method == "fit"

    def __call__(self, ctx: Any) -> Any:
        multi_worker = ctx.world_size > 1 and self.trains_together
        multi_worker_tf = multi_worker and self.backend == "tensorflow"
        # jax.distributed, like TF's collectives, starts once per process: a fresh one per run.
        if multi_worker or not _can_use_backend_here(self.backend):
            env = {"KERAS_BACKEND": self.backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
            if multi_worker_tf:
                import ray

                port = rendezvous.tensorflow_port(ctx.local_rank, ctx.local_world_size)
                own = f"{ray.util.get_node_ip_address()}:{port}"
                addresses = rendezvous.all_gather_addresses(
                    ctx.rank, ctx.world_size, own, rendezvous.listen_address(ctx), ctx.master_port,
                    self.rendezvous_key)
                env["TF_CONFIG"] = distribution.tf_config(addresses, ctx.rank)
            from gpu_proxy_keras.fresh_process import run_in_fresh_process

            return run_in_fresh_process(self, ctx, env)
        os.environ["KERAS_BACKEND"] = self.backend
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return self.run_here(ctx)

    def run_here(self, ctx: Any) -> Any:
        import keras

        from gpu_proxy_keras import callback_state, trained_state, worker_callbacks
        from gpu_proxy_keras import worker_events, worker_reset  # noqa: F401  (a pooled worker puts Keras back)

        world_size = ctx.world_size if self.trains_together else 1
        multi_worker = world_size > 1
        jax_together = self.backend == "jax" and world_size > 1
        if jax_together:  # before anything else touches JAX (the user's objects may hold jax arrays)
            from gpu_proxy_keras import jax_distribution

            jax_distribution.setup(ctx.rank, world_size, ctx.master_addr, ctx.master_port)
        user = self.user_objects.loads()
        strategy = distribution.tensorflow_strategy(world_size) if self.backend == "tensorflow" else None
        if strategy is not None:
            with strategy.scope():
                model = _load_model(self.model_archive, user["custom_objects"])
        elif jax_together:  # variables laid out by the distribution just set; never a kept model
            model = _load_model(self.model_archive, user["custom_objects"])
        else:
            from gpu_proxy_keras import model_cache

            model = model_cache.load(self.model_archive, user["custom_objects"],
                                     lambda archive: _load_model(archive, user["custom_objects"]))
        callbacks = worker_callbacks.for_rank(user["callbacks"], ctx.rank)
        if self.checkpoint is not None and ctx.rank == 0:
            from gpu_proxy_keras.epoch_checkpoint import EpochCheckpoint

            # Before the event callback: an epoch home has heard of is already committed.
            callbacks.append(EpochCheckpoint(**self.checkpoint))
        shard = (ctx.rank, ctx.world_size) if self.sharded else None
        merge = None
        if self.sharded and self.method == "evaluate" and ctx.world_size > 1:
            from gpu_proxy_keras.shard_metrics import MergeShardMetrics

            # First: every later callback (the user's, the event stream) sees the combined logs.
            merge = MergeShardMetrics(ctx.rank, ctx.world_size, rendezvous.listen_address(ctx), ctx.master_port,
                                      self.rendezvous_key)
            callbacks.insert(0, merge)
        callbacks.append(worker_events.for_job(ctx, self.batch_events))
        from gpu_proxy_keras import data_sources

        data = {name: data_sources.materialise(value, self.storage_options, shard)
                for name, value in user["data"].items()}
        kwargs = user["kwargs"]
        if jax_together:  # each rank is fed its part of every global batch
            data, kwargs = jax_distribution.local_fit_arguments(data, kwargs, ctx.rank, world_size)
        kwargs = dict(kwargs, **data, verbose=0, callbacks=callbacks)
        before = trained_state.weights_of(model) if self.method != "fit" and ctx.rank == 0 else None
        try:
            with keras.saving.custom_object_scope(user["custom_objects"]):
                result = getattr(model, self.method)(**kwargs)
        finally:
            if merge is not None:
                merge.close()
        # What a local run leaves behind: the model's state. Every rank of a multi-worker fit reads
        # it: under MultiWorkerMirroredStrategy a metric variable is sync-on-read, so reading it is
        # an all-reduce every worker must join (rank 0 alone would wait on peers that have left).
        state = trained_state.capture(model, optimizer=self.method == "fit", unchanged_from=before) \
            if ctx.rank == 0 or multi_worker else None
        if ctx.rank != 0:
            # Every rank's shard of the predictions; home joins them in rank order.
            return {"result": result} if self.method == "predict" and self.sharded else None
        # And the callbacks' state: the user's list, by position (the extra callbacks added above
        # are not in it).
        after = {"state": state, "callbacks": callback_state.capture(user["callbacks"])}
        if self.method == "fit":
            return {"history": result.history, "epoch": list(result.epoch), **after}
        if merge is not None:  # loaded into rank 0's metrics: the state above is the combined one
            result = merge.result(model, bool(user["kwargs"].get("return_dict")))
        return {"result": result, **after}


def _can_use_backend_here(backend: str) -> bool:
    """Keras' backend is fixed once keras is imported; a reused Ray worker may have another one."""
    keras = sys.modules.get("keras")
    return keras is None or keras.backend.backend() == backend


def _load_model(archive: bytes, custom_objects: dict[str, Any]) -> Any:
    import keras

    with tempfile.TemporaryDirectory(prefix="gpu-proxy-keras-") as folder:
        path = os.path.join(folder, "model.keras")
        with open(path, "wb") as file:
            file.write(archive)
        return keras.saving.load_model(path, custom_objects=custom_objects)
