"""Ray Tune on the cluster, the framework-free half: a trial's resources and its staged checkpoints.

Shared by ``gpu_proxy_lightning.tune`` and ``gpu_proxy_keras.tune``, whose ``TuneReportCallback`` s
call ``ray.tune.report`` in the trainable (home for the trial's run) with a checkpoint the run's
rank 0 staged just before: a folder on the trainable's node, or on an fsspec URL both reach. Ray Tune
is imported inside the functions: ``gpu_proxy`` itself needs only Ray's core.
"""
from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs.pool import ask_idle_workers_to_yield

if TYPE_CHECKING:
    from ray.tune import Checkpoint, PlacementGroupFactory


def trial_resources(num_workers: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                    resources_per_worker: Mapping[str, float] | None = None, trainable_cpus: float = 1.0,
                    strategy: str = "PACK") -> "PlacementGroupFactory":
    """The resources of one trial: a bundle for the trainable, then one per gpu-proxy worker.

    Give the same numbers to ``RemoteStrategy`` or ``RemoteFit`` (``num_workers=...,
    resources_per_worker=...``): its workers take the last ``num_workers`` bundles, each of
    ``{"CPU": cpus_per_worker, "GPU": gpus_per_worker, **resources_per_worker}``. ``trainable_cpus=0``
    reserves nothing for the trainable (it mostly waits on its workers' events). With Ray connected,
    it also asks warm gpu-proxy workers idle on the cluster to give their resources back
    (``gpu_proxy.runs.pool.ask_idle_workers_to_yield``): only gpu-proxy runs make them yield, and the
    trials' placement groups would wait for them.
    """
    from ray import tune

    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigurationError(f"trial_resources(num_workers={num_workers!r}): give a whole number >= 1.")
    for name, value in (("cpus_per_worker", cpus_per_worker), ("gpus_per_worker", gpus_per_worker),
                        ("trainable_cpus", trainable_cpus), *dict(resources_per_worker or {}).items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigurationError(f"trial_resources({name}={value!r}): give a number >= 0.")
    worker = {k: float(v) for k, v in {"CPU": cpus_per_worker, "GPU": gpus_per_worker,
                                        **dict(resources_per_worker or {})}.items() if v}
    if not worker:
        raise ConfigurationError("trial_resources(...): a worker must reserve something (cpus_per_worker > 0, "
                                 "gpus_per_worker > 0 or resources_per_worker); Ray places no empty bundle.")
    head = {"CPU": float(trainable_cpus)} if trainable_cpus else {}
    # Warm gpu-proxy workers left idle on this cluster by earlier fits would hold what the trials'
    # placement groups need, and only gpu-proxy runs make them yield: ask now, once Ray is up.
    ask_idle_workers_to_yield()
    return tune.PlacementGroupFactory([head] + [dict(worker) for _ in range(num_workers)], strategy=strategy)


def checkpoint_file(checkpoint: "Checkpoint | None", filename: str) -> str | None:
    """``filename`` inside ``checkpoint``, else inside ``ray.tune.get_checkpoint()``; ``None`` for a
    trial that starts afresh. A path or an fsspec URL (the run's storage)."""
    if checkpoint is None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    return f"{_url_of(checkpoint.filesystem, checkpoint.path).rstrip('/')}/{filename}"


def _url_of(filesystem: Any, path: str) -> str:
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return path
    handler = getattr(filesystem, "handler", None)  # PyFileSystem(FSSpecHandler(fs))
    if hasattr(handler, "fs"):
        return handler.fs.unstrip_protocol(path)
    return f"{filesystem.type_name}://{path}"  # pyarrow's own: s3, gcs, hdfs


def check_filename(filename: object, example: str) -> None:
    if not isinstance(filename, str) or not filename or "/" in filename:
        raise ConfigurationError(f"TuneReportCallback(filename={filename!r}): give a file name, e.g. {example!r}.")


def staged_checkpoint(folder: str) -> "Checkpoint":
    """The Tune checkpoint of a staged folder (a path, or an fsspec URL), which ``tune.report`` copies
    to the run's storage."""
    from ray import tune

    if "://" not in folder:
        return tune.Checkpoint.from_directory(folder)
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(folder)
    return tune.Checkpoint(path, filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)))


def remove_staged(folder: str) -> None:
    """Delete a staged checkpoint once Tune has its copy."""
    if "://" not in folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def metric_names(metrics: "str | Sequence[str] | Mapping[str, str] | None") -> dict[str, str] | None:
    """``{"tune_name": "logged_name"}`` from what ``TuneReportCallback(metrics=...)`` takes; None: all."""
    if metrics is None:
        return None
    if isinstance(metrics, str):
        return {metrics: metrics}
    if isinstance(metrics, Mapping):
        names = dict(metrics)
    elif isinstance(metrics, Sequence):
        names = {name: name for name in metrics}
    else:
        names = {}
    if not names or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ConfigurationError(f"TuneReportCallback(metrics={metrics!r}): give None (all), a name, a list of "
                                 "names, or {'tune_name': 'logged_name'}.")
    return names


def select_metrics(names: dict[str, str] | None, logged: Mapping[str, Any], where: str) -> dict[str, Any]:
    """What to report of ``logged``: every number (``names`` None), else the named ones; a name that
    was not logged is a ``KeyError`` listing those that were (``where``: what holds them)."""
    if names is None:
        return {k: v for k, v in logged.items() if isinstance(v, (int, float))}
    missing = sorted(set(names.values()) - set(logged))
    if missing:
        raise KeyError(f"TuneReportCallback: {missing} not in {where} (logged: {sorted(logged)}); "
                       "log them or report others.")
    return {name: logged[source] for name, source in names.items()}


def node_id() -> str | None:
    """This process's Ray node, when Ray is connected here."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
