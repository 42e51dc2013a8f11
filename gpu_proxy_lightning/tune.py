"""Ray Tune on the cluster: trials that fit through ``RemoteStrategy``, reported to Tune as they go.

Tune runs each trial's trainable in a process of its own on the cluster, inside a placement group
Tune reserved for the trial. ``RemoteStrategy(cluster=None)`` there uses the Ray the trainable runs
on, and places the run's workers in the trial's own bundles (``gpu_proxy/runs/pool.py``, invariant
7), so Tune's accounting holds: a trial starts only when all its workers fit, and its workers end
with it. :func:`trial_resources` is the placement group to give ``tune.with_resources``: one bundle
for the trainable, then one per worker.

:class:`TuneReportCallback` runs at home, that is in the trainable, like any
:class:`~gpu_proxy_lightning.home_callbacks.HomeCallback`: on rank 0's hook (``on_validation_end``
by default) it reports the metrics that streamed home to ``ray.tune.report``, with a checkpoint the
workers saved just before (every rank takes part, as in ``Trainer.save_checkpoint``). Tune copies
the checkpoint to the run's storage (``RunConfig(storage_path=...)``); a scheduler that stops the
trial (ASHA) ends it at that report; one that restores a trial (PBT, a retried failure) hands the
trainable a checkpoint, and ``fit(ckpt_path=checkpoint_path())`` resumes from it.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs.pool import ask_idle_workers_to_yield
from gpu_proxy.version_gates import require_extra
from gpu_proxy_lightning.home_callbacks import HomeCallback

# Ray Tune needs pandas and pyarrow, which gpu-proxy's own Ray (ray[default]) does not bring.
require_extra("tune", "ray.tune", "gpu_proxy_lightning.tune (Ray Tune sweeps)")

if TYPE_CHECKING:
    from ray.tune import Checkpoint, PlacementGroupFactory

CHECKPOINT_FILE = "checkpoint.ckpt"
REPORT_HOOKS = {"validation_end": "on_validation_end", "train_epoch_end": "on_train_epoch_end",
                "train_end": "on_train_end"}


def trial_resources(num_workers: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                    resources_per_worker: Mapping[str, float] | None = None, trainable_cpus: float = 1.0,
                    strategy: str = "PACK") -> "PlacementGroupFactory":
    """The resources of one trial: a bundle for the trainable, then one per gpu-proxy worker.

    Give the same numbers to ``RemoteStrategy(num_workers=..., resources_per_worker=...)``: its
    workers take the last ``num_workers`` bundles, each of ``{"CPU": cpus_per_worker, "GPU":
    gpus_per_worker, **resources_per_worker}``. ``trainable_cpus=0`` reserves nothing for the
    trainable (it mostly waits on its workers' events). With Ray connected, it also asks warm gpu-proxy
    workers idle on the cluster to give their resources back (``gpu_proxy.runs.pool.ask_idle_workers_to_yield``):
    only gpu-proxy runs make them yield, and the trials' placement groups would wait for them.
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


def checkpoint_path(checkpoint: "Checkpoint | None" = None, filename: str = CHECKPOINT_FILE) -> str | None:
    """The checkpoint file to resume from (``fit(ckpt_path=...)``): of ``checkpoint``, else of
    ``ray.tune.get_checkpoint()``; ``None`` for a trial that starts afresh. A path or an fsspec URL
    the workers open (the run's storage)."""
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


class TuneReportCallback(HomeCallback):
    """Report the run's metrics, and a checkpoint, to Ray Tune at each ``on`` hook of rank 0.

    Args:
        metrics: what to report: ``None`` for every scalar in ``trainer.callback_metrics``; names
            (``["val_loss"]``); or ``{"tune_name": "logged_name"}``. A name that was not logged ends
            the trial with an error that lists those that were.
        on: ``"validation_end"`` (default), ``"train_epoch_end"`` or ``"train_end"``. The sanity
            check's validation is never reported.
        save_checkpoint: the workers save ``Trainer.save_checkpoint`` first and Tune keeps it (what
            schedulers that restore trials, PBT, and ``checkpoint_path()`` need).
        filename: the checkpoint's file name inside Tune's checkpoint folder.
        staging_dir: where the workers write a checkpoint before Tune copies it to the run's storage:
            default a temporary folder on the trainable's node, which needs rank 0 on that node
            (``trial_resources`` packs a trial's bundles); otherwise an fsspec URL both reach.
    """

    def __init__(self, metrics: str | Sequence[str] | Mapping[str, str] | None = None, on: str = "validation_end",
                 save_checkpoint: bool = True, filename: str = CHECKPOINT_FILE, staging_dir: str | None = None) -> None:
        if on not in REPORT_HOOKS:
            raise ConfigurationError(f"TuneReportCallback(on={on!r}): give one of {sorted(REPORT_HOOKS)}.")
        if not isinstance(filename, str) or not filename or "/" in filename:
            raise ConfigurationError(f"TuneReportCallback(filename={filename!r}): give a file name, e.g. "
                                     f"{CHECKPOINT_FILE!r}.")
        self.hook = REPORT_HOOKS[on]
        self.save_checkpoint = bool(save_checkpoint)
        self.filename = filename
        self.home_node = _node_id()
        if staging_dir is None:
            staging_dir = tempfile.mkdtemp(prefix="gpu-proxy-tune-")
            weakref.finalize(self, shutil.rmtree, staging_dir, True)
        self.staging_dir = str(staging_dir).rstrip("/")
        super().__init__(_TuneReporter(self, _metric_names(metrics)))

    @override
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "hook": self.hook, "save_checkpoint": self.save_checkpoint,
                "filename": self.filename, "home_node": self.home_node, "staging_dir": self.staging_dir}

    def staged_folder(self, trainer: Any) -> str:
        """Where the checkpoint of this report is staged: the same name on the workers and at home."""
        return f"{self.staging_dir}/epoch={trainer.current_epoch}-step={trainer.global_step}"

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        local = "://" not in self.staging_dir
        if self.callback is None and self.save_checkpoint and local and trainer.global_rank == 0:
            node = _node_id()
            if self.home_node is not None and node is not None and node != self.home_node:
                raise ConfigurationError(
                    f"TuneReportCallback: rank 0 runs on node {node}, the trainable on {self.home_node}, so a "
                    f"checkpoint in {self.staging_dir} would not reach Tune. Give staging_dir= an fsspec URL "
                    "both reach (beside the Tune run's storage_path), or keep a trial on one node.")

    @override
    def _send_home(self, trainer: Any, hook: str) -> None:
        if self.callback is not None or hook != self.hook or trainer.sanity_checking:
            return
        if self.save_checkpoint:  # on every rank: saving is a collective (a barrier; shards for FSDP)
            trainer.save_checkpoint(f"{self.staged_folder(trainer)}/{self.filename}")
            wait = getattr(trainer.strategy.checkpoint_io, "wait", None)  # an asynchronous upload committed
            if wait is not None:
                wait()
        super()._send_home(trainer, hook)


class _TuneReporter(Callback):
    """The home half: ``tune.report`` from the numbers and the checkpoint the workers sent."""

    def __init__(self, shell: TuneReportCallback, metrics: dict[str, str] | None) -> None:
        self._shell = shell
        self._metrics = metrics

    @override
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._report(trainer, "on_validation_end")

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._report(trainer, "on_train_epoch_end")

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._report(trainer, "on_train_end")

    def _report(self, trainer: Any, hook: str) -> None:
        from ray import tune

        if hook != self._shell.hook or trainer.sanity_checking:
            return
        logged = {k: v.item() if hasattr(v, "item") else v for k, v in trainer.callback_metrics.items()}
        if self._metrics is None:
            metrics = {k: v for k, v in logged.items() if isinstance(v, (int, float))}
        else:
            missing = sorted(set(self._metrics.values()) - set(logged))
            if missing:
                raise KeyError(f"TuneReportCallback: {missing} not in trainer.callback_metrics (logged: "
                               f"{sorted(logged)}); log them with self.log(...) or report others.")
            metrics = {name: logged[source] for name, source in self._metrics.items()}
        if not self._shell.save_checkpoint:
            tune.report(metrics)
            return
        folder = self._shell.staged_folder(trainer)
        try:
            tune.report(metrics, checkpoint=_staged_checkpoint(folder))  # Tune copies it to the run's storage
        finally:
            _remove(folder)


def _staged_checkpoint(folder: str) -> "Checkpoint":
    from ray import tune

    if "://" not in folder:
        return tune.Checkpoint.from_directory(folder)
    import fsspec
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(folder)
    return tune.Checkpoint(path, filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)))


def _remove(folder: str) -> None:
    if "://" not in folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(folder)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _metric_names(metrics: str | Sequence[str] | Mapping[str, str] | None) -> dict[str, str] | None:
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


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
