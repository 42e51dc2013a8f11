"""The worker side of a Lightning run's event stream.

:class:`WorkerEventCallback` tells home, from rank 0, every progress-bar hook with the numbers the
bar reads (batch counts, epoch, progress-bar metrics), so home can draw the Trainer's own bar.
:class:`RelayLogger` passes every ``log_metrics``/``log_hyperparams`` call home for the home
loggers. Both only append to the emitter's queue: the step loop never waits on the network.
Home's stop request (Ctrl-C, a spent budget, home gone) is agreed by all ranks every
``STOP_CHECK_EVERY`` batches of any loop (training, validation, test, predict, sanity check), so
every rank stops at the same step and no rank is left waiting in a collective.
"""
from __future__ import annotations

import time
from argparse import Namespace
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from gpu_proxy import events
from gpu_proxy.runs import WorkerContext

STOP_CHECK_EVERY = 10
BATCH_EVENT_INTERVAL_S = 0.05  # a bar redraws a few times a second; more batch events only cost the loop
RELAYED_HOOKS = (
    "on_sanity_check_start", "on_sanity_check_end", "on_train_start", "on_train_end",
    "on_train_epoch_start", "on_train_epoch_end", "on_validation_start", "on_validation_end",
    "on_test_start", "on_test_end", "on_predict_start", "on_predict_end",
)
EVAL_LOOP_STARTS = ("on_validation_start", "on_test_start", "on_predict_start")  # sanity check: validation
RELAYED_BATCH_HOOKS = (
    "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end", "on_predict_batch_start", "on_predict_batch_end",
)


class StopUnwind(KeyboardInterrupt):
    """Raised on every rank at the same step once the ranks agreed to stop: it unwinds Lightning's
    loops as Ctrl-C does locally (a KeyboardInterrupt, so Lightning's own interrupt handling runs)."""


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        value = value.item() if hasattr(value, "item") else value
        out[key] = value if isinstance(value, (int, float)) else str(value)
    return out


def _is_last_batch(trainer: Any, hook: str, batch_idx: int, dataloader_idx: int) -> bool:
    stage = hook[len("on_"):-len("_batch_end")]
    try:
        if stage == "train":
            total = trainer.num_training_batches
        else:
            totals = {"validation": trainer.num_sanity_val_batches if trainer.sanity_checking
                      else trainer.num_val_batches,
                      "test": trainer.num_test_batches, "predict": trainer.num_predict_batches}[stage]
            total = totals[dataloader_idx]
    except (IndexError, KeyError, TypeError):
        return True
    return batch_idx + 1 >= total


def _batch_counts(trainer: Any) -> dict[str, Any]:
    def safe(name: str) -> Any:
        try:
            return getattr(trainer, name)
        except (AttributeError, RuntimeError, TypeError):
            return None

    return {name: safe(name) for name in ("num_training_batches", "num_val_batches", "num_sanity_val_batches",
                                          "num_test_batches", "num_predict_batches")}


class WorkerEventCallback(Callback):
    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        self._batches_seen = 0  # the same count on every rank: DDP ranks run the same number of batches
        self._last_batch_event = 0.0
        self._eval_batches = 0  # batches of the evaluation loop running now (validation/test/predict)
        self._eval_limit = 0.0  # the fewest batches any rank runs in it: stop checks stay below

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Home draws the progress bar from the event stream; a worker's bar would print twice.
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()

    def _emit(self, trainer: Any, hook: str, batch_idx: int | None = None, dataloader_idx: int = 0) -> None:
        if trainer.global_rank != 0:
            return
        if batch_idx is not None and hook.endswith("_batch_end") and not self._due(trainer, hook, batch_idx,
                                                                                    dataloader_idx):
            return
        self._ctx.emit(events.PROGRESS, {
            "hook": hook, "batch_idx": batch_idx, "dataloader_idx": dataloader_idx,
            "stage": trainer.state.stage.value if trainer.state.stage else None,
            "fn": trainer.state.fn.value if trainer.state.fn else None,
            "epoch": trainer.current_epoch, "global_step": trainer.global_step,
            "metrics": _scalars(trainer.progress_bar_metrics), **_batch_counts(trainer),
        })

    def _due(self, trainer: Any, hook: str, batch_idx: int, dataloader_idx: int) -> bool:
        """Batch events at most every BATCH_EVENT_INTERVAL_S, but always a loop's last batch."""
        now = time.monotonic()
        if now - self._last_batch_event >= BATCH_EVENT_INTERVAL_S or _is_last_batch(trainer, hook, batch_idx,
                                                                                      dataloader_idx):
            self._last_batch_event = now
            return True
        return False

    def _check_stop(self, trainer: Any) -> None:
        self._batches_seen += 1
        if self._batches_seen % STOP_CHECK_EVERY:
            return
        self._agree_on_stop(trainer)

    def _agree_on_stop(self, trainer: Any) -> None:
        # A collective: every rank calls it at the same batch count, so every rank stops at the same step.
        if trainer.strategy.reduce_boolean_decision(self._ctx.should_stop(), all=False):
            raise StopUnwind("home asked the run to stop")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._emit(trainer, "on_train_batch_end", batch_idx)
        self._check_stop(trainer)

    def _start_eval_loop(self, trainer: Any, name: str) -> None:
        """Validation, test, predict and the sanity check stop at a batch too.

        Unlike training, ranks may run different numbers of batches here (predict's sampler does not
        pad; a user's sampler may not either), so a rank must not call the stop collective at a batch
        another rank never reaches: the ranks agree at loop start on the fewest batches any has, and
        check only up to there.
        """
        self._emit(trainer, name)
        self._eval_batches = 0
        self._eval_limit = _fewest_batches(trainer, name[len("on_"):-len("_start")])

    def _check_eval_stop(self, trainer: Any) -> None:
        self._eval_batches += 1
        if self._eval_batches % STOP_CHECK_EVERY == 0 and self._eval_batches <= self._eval_limit:
            self._agree_on_stop(trainer)


def _fewest_batches(trainer: Any, stage: str) -> float:
    """The fewest batches any rank runs in this loop (all dataloaders); a collective on every rank."""
    counts = (trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches) \
        if stage == "validation" else {"test": trainer.num_test_batches, "predict": trainer.num_predict_batches}[stage]
    total = float(sum(counts)) if isinstance(counts, (list, tuple)) else float(counts or 0)
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        fewest = torch.tensor([total], dtype=torch.float64, device=trainer.strategy.root_device)
        torch.distributed.all_reduce(fewest, op=torch.distributed.ReduceOp.MIN)
        total = float(fewest.item())
    return total


def _stage_hook(name: str):
    def relay(self, trainer, pl_module):
        self._emit(trainer, name)
    return relay


def _batch_start_hook(name: str):
    def relay(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._emit(trainer, name, batch_idx, dataloader_idx)
    return relay


def _batch_end_hook(name: str):
    def relay(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._emit(trainer, name, batch_idx, dataloader_idx)
        self._check_eval_stop(trainer)
    return relay


def _eval_start_hook(name: str):
    def start(self, trainer, pl_module):
        self._start_eval_loop(trainer, name)
    return start


for _name in RELAYED_HOOKS:
    setattr(WorkerEventCallback, _name, _stage_hook(_name))
for _name in EVAL_LOOP_STARTS:
    setattr(WorkerEventCallback, _name, _eval_start_hook(_name))
for _name in RELAYED_BATCH_HOOKS:
    if _name != "on_train_batch_end":  # defined above: it also checks for a stop request
        factory = _batch_end_hook if _name.endswith("_end") else _batch_start_hook
        setattr(WorkerEventCallback, _name, factory(_name))


class RelayLogger(Logger):
    """A logger on rank 0 that passes every call home, where the home loggers replay it."""

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__()
        self._ctx = ctx

    @property
    def name(self) -> str:
        return "gpu_proxy_relay"

    @property
    def version(self) -> str:
        return "relay"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._ctx.rank == 0:
            self._ctx.emit(events.METRICS, {"metrics": _scalars(metrics), "step": step})

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        if self._ctx.rank == 0:
            params = vars(params) if isinstance(params, Namespace) else dict(params)
            self._ctx.emit(events.HPARAMS, {"params": {k: v if isinstance(v, (int, float, str, bool, type(None)))
                                                       else repr(v) for k, v in params.items()}})
