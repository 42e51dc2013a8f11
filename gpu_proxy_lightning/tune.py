"""Ray Tune on the cluster: trials that fit through ``RemoteStrategy``, reported to Tune as they go.

Tune runs each trial's trainable in a process of its own on the cluster, inside a placement group
Tune reserved for the trial. ``RemoteStrategy(cluster=None)`` there uses the Ray the trainable runs
on, and places the run's workers in the trial's own bundles (``gpu_proxy/runs/pool.py``, invariant
8), so Tune's accounting holds: a trial starts only when all its workers fit, and its workers end
with it. :func:`trial_resources` (shared with Keras: ``gpu_proxy.tune_support``) is the placement
group to give ``tune.with_resources``: one bundle for the trainable, then one per worker.

:class:`TuneReportCallback` runs at home, that is in the trainable, like any
:class:`~gpu_proxy_lightning.home_callbacks.HomeCallback`: on rank 0's hook (``on_validation_end``
by default) it reports the metrics that streamed home to ``ray.tune.report``, with a checkpoint the
workers saved just before (every rank takes part, as in ``Trainer.save_checkpoint``). Tune copies
the checkpoint to the run's storage (``RunConfig(storage_path=...)``); a scheduler that stops the
trial (ASHA) ends it at that report; one that restores a trial (PBT, a retried failure) hands the
trainable a checkpoint, and ``fit(ckpt_path=checkpoint_path())`` resumes from it.

On a metered cluster (home's cost meter publishing, :mod:`gpu_proxy.tune_cost`) each report adds
the trial's ``cost_usd`` and the cluster's ``cluster_spent_usd``. Once the cluster's budget is
reached the trial's run stops at its next step on every rank (the run's ordinary stop request; a
``ModelCheckpoint`` gets ``interrupted.ckpt``, as on Ctrl-C), and the trial makes a last report with
``budget_reached`` and that checkpoint, which ``BudgetStopper`` ends the trial and the sweep on.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from gpu_proxy.version_gates import require_extra

# Ray Tune needs pandas and pyarrow, which gpu-proxy's own Ray (ray[default]) does not bring. First: what
# follows imports ray.tune (gpu_proxy.tune_cost), and a missing extra must be named, not a ModuleNotFoundError.
require_extra("tune", "ray.tune", "gpu_proxy_lightning.tune (Ray Tune sweeps)")

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.tune_support import check_filename, checkpoint_file, metric_names, node_id, remove_staged
from gpu_proxy.tune_cost import BUDGET_KEY, BudgetStopper, TrialCost
from gpu_proxy.tune_support import select_metrics, staged_checkpoint, trial_resources
from gpu_proxy_lightning.home_callbacks import HomeCallback

if TYPE_CHECKING:
    from ray.tune import Checkpoint

__all__ = ["BudgetStopper", "TuneReportCallback", "checkpoint_path", "trial_resources"]

CHECKPOINT_FILE = "checkpoint.ckpt"
REPORT_HOOKS = {"validation_end": "on_validation_end", "train_epoch_end": "on_train_epoch_end",
                "train_end": "on_train_end"}
_staged_checkpoint = staged_checkpoint  # this module's name for it before it moved to gpu_proxy.tune_support


def checkpoint_path(checkpoint: "Checkpoint | None" = None, filename: str = CHECKPOINT_FILE) -> str | None:
    """The checkpoint file to resume from (``fit(ckpt_path=...)``): of ``checkpoint``, else of
    ``ray.tune.get_checkpoint()``; ``None`` for a trial that starts afresh. A path or an fsspec URL
    the workers open (the run's storage)."""
    return checkpoint_file(checkpoint, filename)


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
        check_filename(filename, CHECKPOINT_FILE)
        self.hook = REPORT_HOOKS[on]
        self.save_checkpoint = bool(save_checkpoint)
        self.filename = filename
        self.home_node = node_id()
        if staging_dir is None:
            staging_dir = tempfile.mkdtemp(prefix="gpu-proxy-tune-")
            weakref.finalize(self, shutil.rmtree, staging_dir, True)
        self.staging_dir = str(staging_dir).rstrip("/")
        super().__init__(_TuneReporter(self, metric_names(metrics)))

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
            node = node_id()
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
        self._cost = TrialCost()  # from now: the trainable runs once Tune has placed the trial
        self._reported: dict[str, Any] | None = None  # the last report's metrics

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
        metrics = select_metrics(self._metrics, logged, "trainer.callback_metrics (self.log(...))")
        self._reported = metrics
        metrics = {**metrics, **self._cost.fields()}
        if not self._shell.save_checkpoint:
            tune.report(metrics)
            return
        folder = self._shell.staged_folder(trainer)
        try:
            tune.report(metrics, checkpoint=staged_checkpoint(folder))  # Tune copies it to the run's storage
        finally:
            remove_staged(folder)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """A run the budget stopped: one last report, ``budget_reached`` with the step's checkpoint
        (``interrupted.ckpt``, when a ``ModelCheckpoint`` saved one), so ``BudgetStopper`` ends the
        trial here instead of Tune recording the stop as the trial's failure."""
        from ray import tune

        from gpu_proxy.errors import RunStoppedError

        if not (isinstance(exception, RunStoppedError) and self._cost.budget_reached) or self._reported is None:
            return  # before the first report Tune would refuse a result without the sweep's metric
        metrics = {**self._reported, **self._cost.fields(), BUDGET_KEY: True}
        saved = _interrupted_checkpoint(trainer)
        if saved is None:
            tune.report(metrics)
            return
        folder = tempfile.mkdtemp(prefix="gpu-proxy-tune-budget-")
        try:
            shutil.copyfile(saved, f"{folder}/{self._shell.filename}")
            tune.report(metrics, checkpoint=staged_checkpoint(folder))
        finally:
            remove_staged(folder)


def _interrupted_checkpoint(trainer: Any) -> str | None:
    """The ``interrupted.ckpt`` the stopped run's ``ModelCheckpoint`` saved, when home can open it."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    path = f"{str(dirpath).rstrip('/')}/interrupted.ckpt" if dirpath else None
    return path if path and "://" not in path and os.path.isfile(path) else None
