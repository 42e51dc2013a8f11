"""Ray Tune on the cluster for Keras: trials that fit through ``RemoteFit``, reported to Tune as they go.

Tune runs each trial's trainable in a process of its own on the cluster, inside a placement group
Tune reserved for the trial (:func:`trial_resources`: one bundle for the trainable, then one per
worker). ``RemoteFit(cluster=None)`` there uses the Ray the trainable runs on, and the run's workers
go in the trial's own bundles (``gpu_proxy/runs/pool.py``, invariant 8), as for Lightning.

:class:`TuneReportCallback` is a ``RemoteFit`` home callback: it runs in the trainable, where Tune's
session is, on rank 0's streamed ``on_epoch_end``, and calls ``ray.tune.report`` with the epoch's
logs (what ``History`` records) and a checkpoint: its worker half (``worker_callback``, shipped by
``RemoteFit`` after the user's ``fit`` callbacks) saves the model with Keras' ``model.save`` on rank
0 at that epoch's end, before rank 0 sends the epoch home. Tune copies the checkpoint to the run's
storage; a trial Tune restores (PBT, a retried failure) puts it back with :func:`restore_checkpoint`,
which returns the ``initial_epoch`` to continue from. A scheduler that stops the trial (ASHA) makes
``tune.report`` raise ``SystemExit``: the run stops at its next epoch end on every rank (its workers
freed, the model holding the epochs done) and ``fit`` raises it, as a local Keras fit would.

On a metered cluster (home's cost meter publishing, :mod:`gpu_proxy.tune_cost`) each report adds
the trial's ``cost_usd`` and the cluster's ``cluster_spent_usd``; once the budget is reached the
run stops at its next epoch end and ``fit`` raises ``RunStoppedError`` (Tune keeps the last epoch's
checkpoint), and ``BudgetStopper`` ends the sweep.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import weakref
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import keras
from typing_extensions import override

from gpu_proxy.version_gates import require_extra

# Ray Tune needs pandas and pyarrow, which gpu-proxy's own Ray (ray[default]) does not bring. First: what
# follows imports ray.tune (gpu_proxy.tune_cost), and a missing extra must be named, not a ModuleNotFoundError.
require_extra("tune", "ray.tune", "gpu_proxy_keras.tune (Ray Tune sweeps)")

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.tune_support import check_filename, checkpoint_file, metric_names, remove_staged, select_metrics
from gpu_proxy.tune_cost import BudgetStopper, TrialCost
from gpu_proxy.tune_support import staged_checkpoint, trial_resources

if TYPE_CHECKING:
    from ray.tune import Checkpoint

__all__ = ["BudgetStopper", "TuneReportCallback", "checkpoint_path", "restore_checkpoint", "trial_resources"]

MODEL_FILE = "model.keras"
EPOCH_KEY = "gpu_proxy_epoch"  # in a checkpoint's Tune metadata: the epoch (0-based) whose end it holds


class TuneReportCallback(keras.callbacks.Callback):
    """Report each epoch's logs, and a checkpoint of the model, to Ray Tune.

    A home callback: ``RemoteFit(model, home_callbacks=[TuneReportCallback(...)])``, made inside the
    trainable. Passed to ``fit(callbacks=...)`` it would run on the workers, away from Tune's session,
    and is refused there.

    Args:
        metrics: what to report: ``None`` for every number in the epoch's logs (``loss``,
            ``val_loss``, the compiled metrics); names (``["val_loss"]``); or ``{"tune_name":
            "logged_name"}``. A name not in an epoch's logs (``validation_freq`` > 1, a typo) ends
            the trial with an error that lists those that were.
        save_checkpoint: rank 0 saves the model (``model.save``: weights, optimizer state) at each
            epoch end and the report carries it (what ``restore_checkpoint``, PBT and a retried
            failure need).
        filename: the model's file name inside Tune's checkpoint folder (a ``.keras`` archive).
        staging_dir: where rank 0 writes the checkpoint before Tune copies it to the run's storage:
            default a temporary folder on the trainable's host, which needs rank 0 on that host
            (``trial_resources`` packs a trial's bundles); otherwise an fsspec URL both reach.
    """

    def __init__(self, metrics: str | Sequence[str] | Mapping[str, str] | None = None, save_checkpoint: bool = True,
                 filename: str = MODEL_FILE, staging_dir: str | None = None) -> None:
        super().__init__()
        check_filename(filename, MODEL_FILE)
        if not filename.endswith(".keras"):
            raise ConfigurationError(f"TuneReportCallback(filename={filename!r}): Keras saves a model as a "
                                     f"'.keras' archive; give e.g. {MODEL_FILE!r}.")
        if staging_dir is not None and (not isinstance(staging_dir, str) or not staging_dir.strip()):
            raise ConfigurationError(f"TuneReportCallback(staging_dir={staging_dir!r}): give a folder or an fsspec "
                                     "URL both the trainable and rank 0 reach, e.g. 's3://bucket/tune-staging'.")
        self.metric_names = metric_names(metrics)
        self.save_checkpoint = bool(save_checkpoint)
        self.filename = filename
        if staging_dir is None:
            staging_dir = tempfile.mkdtemp(prefix="gpu-proxy-tune-")
            weakref.finalize(self, shutil.rmtree, staging_dir, True)
        self.staging_dir = staging_dir.rstrip("/")
        self.cost = TrialCost()  # from now: the trainable runs once Tune has placed the trial

    def worker_callback(self) -> keras.callbacks.Callback | None:
        """What ``RemoteFit`` runs on the workers for this callback: the checkpoint's save."""
        if not self.save_checkpoint:
            return None
        return _SaveForTune(self.staging_dir, self.filename, socket.gethostname())

    def __reduce__(self) -> Any:
        raise ConfigurationError(
            "TuneReportCallback runs at home, in the trainable, where Ray Tune's session is: make it inside "
            "the trainable and give it to RemoteFit(model, home_callbacks=[TuneReportCallback(...)]), not to "
            "fit(callbacks=...), whose callbacks run on the workers.")

    @override
    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from ray import tune

        metrics = {**select_metrics(self.metric_names, dict(logs or {}), f"epoch {epoch}'s logs"),
                   **self.cost.fields()}
        if not self.save_checkpoint:
            tune.report(metrics)
            return
        folder = staged_folder(self.staging_dir, epoch)
        try:
            checkpoint = staged_checkpoint(folder)
            checkpoint.set_metadata({EPOCH_KEY: epoch})
            tune.report(metrics, checkpoint=checkpoint)  # Tune copies it to the run's storage
        finally:
            remove_staged(folder)


def staged_folder(staging_dir: str, epoch: int) -> str:
    """Where an epoch's checkpoint is staged: the same name on rank 0 and at home."""
    return f"{staging_dir}/epoch={epoch}"


class _SaveForTune(keras.callbacks.Callback):
    """The workers' half: at each epoch end, rank 0 saves the model into the folder home reports from
    (alone, as ``epoch_checkpoint.EpochCheckpoint`` does: under MultiWorkerMirroredStrategy too, tested)."""

    def __init__(self, staging_dir: str, filename: str, home_host: str) -> None:
        super().__init__()
        self.staging_dir = staging_dir
        self.filename = filename
        self.home_host = home_host

    @override
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        here = socket.gethostname()
        if _rank() == 0 and "://" not in self.staging_dir and here != self.home_host:
            raise ConfigurationError(
                f"TuneReportCallback: rank 0 runs on host {here}, the trainable on {self.home_host}, so a "
                f"checkpoint staged in {self.staging_dir} would not reach Tune. Give staging_dir= an fsspec URL "
                "both reach (beside the Tune run's storage_path), or keep a trial on one node "
                "(trial_resources(strategy='STRICT_PACK')).")

    @override
    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if _rank() != 0:
            return
        folder = staged_folder(self.staging_dir, epoch)
        if "://" not in folder:
            os.makedirs(folder, exist_ok=True)
            self.model.save(os.path.join(folder, self.filename))
            return
        import fsspec

        fs, path = fsspec.core.url_to_fs(folder)
        with tempfile.TemporaryDirectory(prefix="gpu-proxy-tune-") as scratch:
            local = os.path.join(scratch, self.filename)
            self.model.save(local)
            fs.makedirs(path, exist_ok=True)
            fs.put_file(local, f"{path}/{self.filename}")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))  # set by the worker for the run's call (gpu_proxy.runs.worker)


def checkpoint_path(checkpoint: "Checkpoint | None" = None, filename: str = MODEL_FILE) -> str | None:
    """The ``.keras`` file of ``checkpoint``, else of ``ray.tune.get_checkpoint()``; ``None`` for a trial
    that starts afresh. A path or an fsspec URL (``keras.saving.load_model`` opens a path)."""
    return checkpoint_file(checkpoint, filename)


def restore_checkpoint(model: keras.Model, checkpoint: "Checkpoint | None" = None, filename: str = MODEL_FILE) -> int:
    """Put a :class:`TuneReportCallback` checkpoint into ``model`` (compiled as for the trial): its
    weights and optimizer state as they were at that epoch's end. ``checkpoint``: by default
    ``ray.tune.get_checkpoint()``, what Tune hands a trial it restores.

    Returns the ``initial_epoch`` to give ``fit``: the epoch after the checkpoint's, so the epochs,
    Tune's iterations and the optimizer's step count go on; ``0`` (``model`` untouched) when there is
    no checkpoint, a trial that starts afresh.
    """
    from gpu_proxy_keras import trained_state
    from gpu_proxy_keras.worker_job import _load_model

    if checkpoint is None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    url = checkpoint_file(checkpoint, filename)
    epoch = checkpoint.get_metadata().get(EPOCH_KEY)
    if epoch is None:
        raise ConfigurationError(f"restore_checkpoint: {url} is not a gpu_proxy_keras.tune.TuneReportCallback "
                                 f"checkpoint (its metadata has no {EPOCH_KEY!r}); load it with "
                                 "keras.saving.load_model.")
    import fsspec

    with fsspec.open(url, "rb") as file:
        archive = file.read()
    saved = _load_model(archive, dict(keras.saving.get_custom_objects()))
    trained_state.restore(model, trained_state.capture(saved))
    return int(epoch) + 1

