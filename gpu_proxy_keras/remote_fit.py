"""``RemoteFit``: Keras' ``fit``/``evaluate``/``predict``, run on a Ray cluster, with results at home.

Home side only: check the arguments, pack the model and the user's objects into a
:class:`~gpu_proxy_keras.worker_job.KerasJob`, run it with the core's ``execute``, replay rank 0's
callback hooks on a home ``CallbackList`` while it runs, and take rank 0's result in.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import keras
import numpy as np

from gpu_proxy import shipping
from gpu_proxy.clusters.base import Cluster
from gpu_proxy.clusters.resolve import ClusterSpec, check_cluster_spec, resolve_cluster, start_early
from gpu_proxy.runs.pool import check_keep_warm
from gpu_proxy.errors import ConfigurationError, RunStoppedError
from gpu_proxy.runs import RunSpec, execute, values
from gpu_proxy.runs.resources import per_worker_resources
from gpu_proxy.runs.restarts import Attempt, run_with_restarts
from gpu_proxy.secrets import Concealed, conceal
from gpu_proxy_keras import arguments, callback_state, data_sources, native_data, rendezvous, trained_state
from gpu_proxy_keras.epoch_checkpoint import Committed, RunCheckpoints, new_run_name
from gpu_proxy_keras.home_events import HomeEventHandler, worker_halves
from gpu_proxy_keras.worker_job import KerasJob


class RemoteFit:
    """Train, evaluate and predict with ``model`` on remote workers, as if it ran here.

    ``fit`` returns a real ``keras.callbacks.History`` (also ``model.history``) and leaves the
    trained weights and optimizer state in ``model``. ``evaluate`` and ``predict`` split the samples
    across the workers (see ``data_sources.py`` and ``shard_metrics.py``) and return what one
    worker evaluating all of them returns: metrics combined from every shard, predictions in input
    order. ``storage_options`` serve both ``checkpoint_dir`` and data given as file URLs.

    On a cluster given by address (a Ray Job), a run whose home stops following it (the process
    killed, the laptop closed) stops at its next epoch end once home's heartbeat has been silent for
    ``home_grace_s`` seconds (None: never); ``gpu-proxy runs`` then shows it STOPPED with the reason.
    On the embedded cluster the run goes with home's process.
    """

    def __init__(self, model: keras.Model, cluster: ClusterSpec = None, num_workers: int = 1,
                 use_gpu: bool | None = None, resources_per_worker: dict[str, float] | None = None,
                 home_callbacks: list[keras.callbacks.Callback] | None = None,
                 checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None,
                 max_failures: int = 0, run_name: str | None = None, staging_dir: str | None = None,
                 home_grace_s: float | None = 300.0, keep_warm: float = 600.0) -> None:
        arguments.check_model(model)
        self.backend = keras.backend.backend()
        arguments.check_workers(num_workers, self.backend)
        arguments.check_checkpoints(checkpoint_dir, max_failures, run_name)
        arguments.check_home_grace(home_grace_s)
        check_cluster_spec(cluster)  # an unknown name fails now, not at the first fit
        self.home_grace_s = home_grace_s
        self.model = model
        self.checkpoint_dir = checkpoint_dir
        self.max_failures = max_failures
        self.run_name = run_name  # None: a new run (new name) per fit; a name: continue that run
        self.run_url: str | None = None  # the last fit's checkpoint folder
        self.cluster = cluster
        self.num_workers = num_workers
        self.use_gpu = use_gpu
        self.resources_per_worker = resources_per_worker
        self.home_callbacks = list(home_callbacks or [])
        self.storage_options = conceal(dict(storage_options)) if storage_options else None  # gpu_proxy.secrets
        if staging_dir is not None and (not isinstance(staging_dir, str) or not staging_dir.strip()):
            raise ConfigurationError(f"staging_dir={staging_dir!r}: give an fsspec URL, e.g. 's3://bucket/staging'.")
        # Where a cluster given only by address stages the model, data and results (see gpu_proxy.dataplane).
        self.staging_dir = staging_dir or (f"{checkpoint_dir.rstrip('/')}/_staging" if checkpoint_dir else None)
        self.keep_warm = check_keep_warm(keep_warm, "RemoteFit")
        self._resolved_cluster: Cluster | None = None
        start_early(cluster)  # the embedded cluster starts while the script prepares its data

    # ----- Keras' methods ------------------------------------------------------------------------
    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = None, epochs: int = 1,
            verbose: Any = "auto", callbacks: list[keras.callbacks.Callback] | None = None,
            validation_split: float = 0.0, validation_data: Any = None, shuffle: bool = True,
            class_weight: dict[int, float] | None = None, sample_weight: Any = None,
            initial_epoch: int = 0, steps_per_epoch: int | None = None,
            validation_steps: int | None = None, validation_batch_size: int | None = None,
            validation_freq: int = 1) -> keras.callbacks.History:
        arguments.check_compiled(self.model, "fit")
        callbacks = list(callbacks or []) + worker_halves(self.home_callbacks)
        data = self._checked_data({"x": x, "y": y, "validation_data": validation_data,
                                   "sample_weight": sample_weight})
        arguments.check_fit(x, epochs, initial_epoch, validation_split, callbacks, self.num_workers)
        kwargs = dict(batch_size=batch_size, epochs=epochs, validation_split=validation_split,
                      shuffle=shuffle, class_weight=class_weight, initial_epoch=initial_epoch,
                      steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                      validation_batch_size=validation_batch_size, validation_freq=validation_freq)
        if self.backend == "jax" and self.num_workers > 1:
            arguments.check_jax_fit(data, kwargs, self.num_workers, self.storage_options)
        storage = self._run_checkpoints()
        resumed = storage.latest() if storage is not None and self.run_name is not None else None
        handler = HomeEventHandler(self.model, verbose, self.home_callbacks, add_history=True)
        try:
            result, resumed = self._fit_with_restarts(data, kwargs, callbacks, handler, storage, resumed)
        except (KeyboardInterrupt, RunStoppedError) as stopped:
            # Stopped from here (Ctrl-C, a cluster's budget): the workers ended their fit at an epoch
            # end, so the model keeps the trained-so-far state, as a local fit interrupted keeps it
            # (model.history already holds the streamed epochs). A stop that carries no outcomes
            # (a second Ctrl-C, an abort) has nothing to bring.
            partial = _rank0_result(getattr(stopped, "outcomes", None))
            resumed = getattr(stopped, "resumed_from", resumed)
            if partial is not None:
                self._take_in(partial, callbacks, verbose, data)
                history = self._record_history(handler, resumed, partial)  # the epochs the state holds
                if handler.stopped_by_callback and isinstance(stopped, RunStoppedError):
                    return history  # a home callback set model.stop_training: fit returns, as locally
            handler.raise_home_error()  # a home callback raised (optuna.TrialPruned): that, as locally
            raise
        if result is None:  # the named run had already committed its last epoch: nothing to train
            trained_state.restore(self.model, _state_of(storage.read(resumed)))
            result = {"history": {}, "epoch": []}
        else:
            self._take_in(result, callbacks, verbose, data)
        return self._record_history(handler, resumed, result)

    def _record_history(self, handler: HomeEventHandler, resumed: Committed | None,
                        result: dict[str, Any]) -> keras.callbacks.History:
        history = handler.history or keras.callbacks.History()
        history.set_model(self.model)
        # The streamed logs went through float(); rank 0's own dict is the exact record, after the
        # committed epochs' own record when the run was resumed from a checkpoint.
        history.history, history.epoch = _joined(resumed, result)
        self.model.history = history
        return history

    def evaluate(self, x: Any = None, y: Any = None, batch_size: int | None = None,
                 verbose: Any = "auto", sample_weight: Any = None, steps: int | None = None,
                 callbacks: list[keras.callbacks.Callback] | None = None,
                 return_dict: bool = False) -> Any:
        arguments.check_compiled(self.model, "evaluate")  # as Keras' own evaluate
        data = self._checked_data({"x": x, "y": y, "sample_weight": sample_weight})
        kwargs = dict(batch_size=batch_size, steps=steps, return_dict=return_dict)
        handler = HomeEventHandler(self.model, verbose, self.home_callbacks, add_history=False)
        callbacks = list(callbacks or [])
        workers = self._shard_workers(data["x"], steps, functions_shard=True)
        results = self._run("evaluate", data, kwargs, callbacks, handler, workers, sharded=workers > 1)
        self._take_in(results[0], callbacks, verbose, data)
        return results[0]["result"]  # rank 0 combined every rank's metric states

    def predict(self, x: Any, batch_size: int | None = None, verbose: Any = "auto",
                steps: int | None = None, callbacks: list[keras.callbacks.Callback] | None = None) -> Any:
        data = self._checked_data({"x": x})
        handler = HomeEventHandler(self.model, verbose, self.home_callbacks, add_history=False)
        callbacks = list(callbacks or [])
        # A function's dataset is split by batches, and batch order across ranks is lost: one worker.
        workers = self._shard_workers(data["x"], steps, functions_shard=False)
        results = self._run("predict", data, dict(batch_size=batch_size, steps=steps),
                            callbacks, handler, workers, sharded=workers > 1)
        self._take_in(results[0], callbacks, verbose, None)
        outputs = [result["result"] for result in results]
        return data_sources.concatenate(outputs) if workers > 1 else outputs[0]

    # ----- what a local run leaves behind --------------------------------------------------------
    def _checked_data(self, data: dict[str, Any]) -> dict[str, Any]:
        """The data arguments, checked, with backend-native tensors as numpy (see native_data.py)."""
        data = {name: native_data.to_numpy(name, value) for name, value in data.items()}
        for name, value in data.items():
            arguments.check_data(name, value, required=name == "x", storage_options=self.storage_options)
        return data

    def _take_in(self, result: dict[str, Any], callbacks: list[Any], verbose: Any,
                 data: dict[str, Any] | None) -> None:
        """Rank 0's model state into the local model, its callbacks' state into the user's objects.

        With sharded evaluate/predict this is rank 0's: its metrics hold every shard's combined
        state (as one worker's would), other variables and callbacks saw rank 0's shard only."""
        trained_state.restore(self.model, result["state"], _first_samples(data))
        callback_state.restore(callbacks, result["callbacks"], self.model, verbose)

    # ----- running -------------------------------------------------------------------------------
    def _shard_workers(self, x: Any, steps: int | None, functions_shard: bool) -> int:
        """How many workers share an evaluate/predict: all, but never more than there are samples."""
        if self.num_workers == 1 or steps is not None:  # `steps` counts batches of the whole data
            return 1
        if callable(x):
            return self.num_workers if functions_shard else 1
        samples = data_sources.sample_count(x, self.storage_options)
        return max(1, min(self.num_workers, samples if samples is not None else self.num_workers))

    def _run_checkpoints(self) -> RunCheckpoints | None:
        """This fit's checkpoint folder, checked at home before anything starts (None: no checkpoints)."""
        if self.checkpoint_dir is None:
            return None
        storage = RunCheckpoints(self.checkpoint_dir, self.run_name or new_run_name(), self.storage_options)
        storage.check()
        self.run_url = storage.run_url
        return storage

    def _fit_with_restarts(self, data: dict[str, Any], kwargs: dict[str, Any], callbacks: list[Any],
                           handler: HomeEventHandler, storage: RunCheckpoints | None,
                           resumed: Committed | None) -> tuple[Any, Committed | None]:
        """Run fit; when a worker dies, start again from the newest committed epoch, up to max_failures."""
        def fit_from(attempt: Attempt[Committed]) -> tuple[Any, Committed | None]:
            resumed = attempt.resume_from
            if resumed is not None and resumed.epoch + 1 >= kwargs["epochs"]:
                return None, resumed
            run_kwargs = dict(kwargs, initial_epoch=resumed.epoch + 1) if resumed is not None else kwargs
            try:
                results = self._run("fit", data, run_kwargs, callbacks, handler, self.num_workers,
                                    archive=storage.read(resumed) if resumed is not None else None,
                                    checkpoint=storage.worker_spec(resumed) if storage is not None else None)
            except (KeyboardInterrupt, RunStoppedError) as stopped:
                # The attempt's own starting point: a stop after a restart joins that one's History.
                stopped.resumed_from = resumed  # type: ignore[union-attr]
                raise
            return results[0], resumed

        return run_with_restarts(fit_from, self.max_failures, storage.latest if storage is not None else None,
                                 _say_restart, resume_from=resumed)

    def _run(self, method: str, data: dict[str, Any], kwargs: dict[str, Any],
             callbacks: list[Any], handler: HomeEventHandler, num_workers: int,
             archive: bytes | None = None, checkpoint: dict[str, Any] | None = None,
             sharded: bool = False) -> list[Any]:
        """Every rank's result, in rank order."""
        user_objects = shipping.pack(
            {"custom_objects": dict(keras.saving.get_custom_objects()), "callbacks": callbacks,
             "data": {k: v for k, v in data.items() if v is not None}, "kwargs": kwargs},
            what="the data, callbacks and custom objects of the run")
        # As an array, the archive travels out of band (uncopied) like the data arrays.
        model_archive = np.frombuffer(archive or _archive(self.model), dtype=np.uint8)
        job = KerasJob(method=method, backend=self.backend, model_archive=model_archive,
                       user_objects=user_objects, checkpoint=checkpoint, storage_options=self.storage_options,
                       batch_events=handler.wants_batches, sharded=sharded,
                       rendezvous_key=Concealed(rendezvous.new_key()))
        secrets: dict[str, str] = {}  # gpu_proxy.secrets: storage credentials travel beside the payload
        spec = RunSpec(payload=shipping.pack(job, secrets=secrets), secrets=secrets, num_workers=num_workers,
                       resources_per_worker=self._worker_resources(), worker_pool=f"keras-{self.backend}",
                       staging_dir=self.staging_dir, staging_options=self.storage_options,
                       home_grace_s=self.home_grace_s, keep_warm_s=self.keep_warm,
                       result_bytes_hint=model_archive.nbytes if method == "fit" else 0)
        return values(execute(self._cluster(), spec, handler.handle))

    def _cluster(self) -> Cluster:
        if self._resolved_cluster is None:
            self._resolved_cluster = resolve_cluster(self.cluster)
        return self._resolved_cluster

    def _worker_resources(self) -> dict[str, float]:
        resources = per_worker_resources(self.resources_per_worker, bool(self.use_gpu))
        if self.use_gpu is False and resources.get("GPU", 0) > 0:
            raise ConfigurationError(
                f"use_gpu=False but resources_per_worker asks for {resources['GPU']} GPU per worker; "
                "drop one of the two.")
        return resources


def _say_restart(attempt: Attempt[Committed]) -> None:
    resumed = attempt.resume_from
    start = f"epoch {resumed.epoch + 2} ({resumed.url})" if resumed else "the start"
    print(f"gpu-proxy: {attempt.after}; restarting from {start}, attempt {attempt.number} of {attempt.of}",
          file=sys.stderr, flush=True)


def _archive(model: keras.Model) -> bytes:
    """The model as Keras' own .keras archive: architecture, weights, compile config, optimizer state."""
    if model.built and getattr(model, "optimizer", None) is not None and not model.optimizer.built:
        # An unbuilt optimizer is saved without its slots and the worker's copy would warn and
        # mismatch; building it now is what the first local fit() step would do anyway.
        model.optimizer.build(model.trainable_variables)
    with tempfile.TemporaryDirectory(prefix="gpu-proxy-keras-") as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        with open(path, "rb") as file:
            return file.read()


def _first_samples(data: dict[str, Any] | None) -> tuple[Any, Any, Any] | None:
    """``(x, y, sample_weight)`` of the first two samples when they are arrays here, else None."""
    if data is None or data.get("y") is None:
        return None
    parts = []
    for name in ("x", "y", "sample_weight"):
        value = data.get(name)
        leaves = list(value.values()) if isinstance(value, dict) else \
            list(value) if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(leaf, np.ndarray) for leaf in leaves):
            return None  # a URL, a function, a PyDataset: only the workers see its samples
        parts.append(_rows(value, slice(0, 2)))
    return tuple(parts)


def _rank0_result(outcomes: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Rank 0's result among a stopped run's outcomes, when it finished with one."""
    try:
        results = values(outcomes) if outcomes else []
    except Exception:  # noqa: BLE001 - a rank failed while stopping: the stop is what is raised
        return None
    return results[0] if results and isinstance(results[0], dict) and "state" in results[0] else None


def _rows(value: Any, rows: slice) -> Any:
    if isinstance(value, dict):
        return {key: _rows(item, rows) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows(item, rows) for item in value)
    return None if value is None else value[rows]


def _state_of(archive: bytes) -> trained_state.TrainedState:
    """The weights and optimizer state held in a committed .keras archive."""
    from gpu_proxy_keras.worker_job import _load_model

    return trained_state.capture(_load_model(archive, dict(keras.saving.get_custom_objects())))


def _joined(resumed: Committed | None, result: dict[str, Any]) -> tuple[dict[str, list], list[int]]:
    """The committed epochs' History record, then the (resumed) run's own."""
    if resumed is None:
        return result["history"], result["epoch"]
    history = {key: list(series) for key, series in resumed.history.items()}
    for key, series in result["history"].items():
        history.setdefault(key, []).extend(series)
    return history, list(resumed.epochs) + list(result["epoch"])
