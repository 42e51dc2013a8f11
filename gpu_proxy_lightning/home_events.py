"""The home side of a Lightning run's event stream: the Trainer's own progress bar, home loggers, logs.

A cluster that meters money (RunPod) adds cost events: the bar shows ``cost_usd`` beside the
loss and the home loggers get it as a metric.

The home Trainer never runs a loop, so its progress bar is driven by hand: before each relayed
hook, the few numbers a bar reads (stage, epoch, batch counts, progress-bar metrics) are set on
the home Trainer as rank 0 had them, then the bar's own hook is called. Whatever bar the user
configured (TQDM, Rich, their own) therefore renders as it would locally. At the end of the run
the launcher restores rank 0's final state over these values.

Home callbacks (:class:`~gpu_proxy_lightning.home_callbacks.HomeCallback`) are driven the same way:
their hooks' events set the numbers a callback reads, then the hook runs here. A hook that raises,
or sets ``trainer.should_stop``, stops the run through its RunControl; the launcher raises the
exception (or, for ``should_stop``, returns as a local fit does) once the run has ended and its
trained-so-far state is restored (``home_error``, ``stopped_by_callback``).
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from gpu_proxy import events
from gpu_proxy.events import Event
from gpu_proxy_lightning.home_callbacks import HOME_HOOK, home_callbacks


class HomeEventHandler:
    def __init__(self, trainer: Any, home_loggers: list[Any] | None = None) -> None:
        self._trainer = trainer
        self._bar = trainer.progress_bar_callback if trainer is not None else None
        self._bar_ready = False
        self._loggers = list(home_loggers or [])
        self._num_nodes = 1
        self._max_step_logged = -1
        self._replayed_up_to = -1  # after a restart: steps up to here were logged before the failure
        self._hparams_logged = False
        self._cost: dict[str, Any] | None = None  # the cluster's latest cost meter reading, if it meters
        self.restarts: list[dict[str, Any]] = []
        self._home_callbacks = home_callbacks(trainer)
        self.home_error: BaseException | None = None  # the first exception a home callback raised
        self.stopped_by_callback = False  # a home callback set trainer.should_stop
        self._stop_asked = False

    # ----- dispatch ---------------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        if event.kind == events.LOG:
            self._log_line(event)
        elif event.kind == events.RUN_STARTED:
            self._num_nodes = event.data.get("num_nodes", 1)
        elif event.kind == events.PROGRESS and self._bar is not None:
            self._progress(event.data)
        elif event.kind == events.METRICS:
            self._log_metrics(event.data["metrics"], event.data.get("step"))
        elif event.kind == events.HPARAMS and not self._hparams_logged:
            self._hparams_logged = True
            for logger in self._loggers:
                logger.log_hyperparams(event.data["params"])
        elif event.kind == events.COST:
            self._cost = event.data
            for logger in self._loggers:  # beside the run's own metrics, at the latest step
                logger.log_metrics({"cost_usd": event.data["spent_usd"]}, max(self._max_step_logged, 0))
        elif event.kind == HOME_HOOK:
            self._home_hook(event.data)
        elif event.kind == events.RESTART:
            self.restarts.append(event.data)
            self._replayed_up_to = self._max_step_logged
            sys.stderr.write(f"gpu-proxy: restarting the run (attempt {event.data['attempt']}) from "
                             f"{event.data.get('resumed_from') or 'the start'}: {event.data['reason']}\n")

    def _log_metrics(self, metrics: dict[str, Any], step: int | None) -> None:
        if step is not None:
            if step <= self._replayed_up_to:
                return  # a resumed run re-logs the steps between its checkpoint and the failure
            self._max_step_logged = max(self._max_step_logged, step)
        for logger in self._loggers:
            logger.log_metrics(metrics, step)

    def _log_line(self, event: Event) -> None:
        where = f"rank {event.rank}" if self._num_nodes == 1 else f"rank {event.rank}, node {event.data.get('node')}"
        stream = sys.stderr if event.data.get("stream") == "stderr" else sys.stdout
        stream.write(f"({where}) {event.data['line']}\n")
        stream.flush()

    # ----- home callbacks ---------------------------------------------------------------------
    def _home_hook(self, data: dict[str, Any]) -> None:
        callback = self._home_callbacks.get(data["id"])
        if callback is None or self.home_error is not None or self.stopped_by_callback:
            return  # a home callback failed or set should_stop: the run is stopping, no more hooks (as locally)
        trainer = self._trainer
        self._apply_state(data)
        trainer._logger_connector._callback_metrics.update(
            {k: torch.tensor(v) for k, v in data["callback_metrics"].items() if isinstance(v, (int, float))})
        progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress
        progress.optimizer.step.total.completed = data["global_step"]  # what trainer.global_step reads
        module = trainer.lightning_module
        attached = getattr(module, "_trainer", None) if module is not None else None
        if module is not None:
            module._trainer = trainer  # pl_module.current_epoch reads the Trainer, as in a local hook
        try:
            getattr(callback.callback, data["hook"])(trainer, module)
        # SystemExit too: ray.tune.report exits the trainable's thread once Tune stopped the trial (ASHA),
        # and the run's workers must stop first (gpu_proxy_lightning/tune.py).
        except (Exception, SystemExit) as error:  # noqa: BLE001 - it ends the run, and fit raises it at the end
            self.home_error = error
            self._stop_run(f"the home callback {type(callback.callback).__name__} raised "
                           f"{type(error).__name__}: {error}")
        finally:
            if module is not None:
                module._trainer = attached
        # Only a fit stops on should_stop (Lightning resets it when fit starts and validate/test ignore
        # it), so a flag left by an earlier fit, as EarlyStopping leaves it, does not end a validate.
        if self.home_error is None and trainer.should_stop and data.get("fn") == "fit":
            self.stopped_by_callback = True
            self._stop_run(f"the home callback {type(callback.callback).__name__} set trainer.should_stop")

    def _stop_run(self, reason: str) -> None:
        """Ask this handler's run to stop at its next step on every rank (once)."""
        if self._stop_asked:
            return
        self._stop_asked = True
        cluster = self._trainer.strategy.resolved_cluster()
        for control in cluster.active_runs():  # the run whose events come to this handler
            if control.on_event == self.handle:
                control.request_stop(reason)

    # ----- progress bar -------------------------------------------------------------------------
    def _apply_state(self, data: dict[str, Any]) -> None:
        trainer = self._trainer
        if data.get("fn"):
            trainer.state.fn = TrainerFn(data["fn"])
        trainer.state.stage = RunningStage(data["stage"]) if data.get("stage") else None
        trainer.fit_loop.epoch_progress.current.completed = data["epoch"]
        if data.get("num_training_batches") is not None:
            trainer.fit_loop.max_batches = data["num_training_batches"]
        if data.get("num_val_batches") is not None:
            loop = trainer.validate_loop if data.get("fn") == "validate" else trainer.fit_loop.epoch_loop.val_loop
            loop._max_batches = list(data["num_val_batches"])
        if data.get("num_test_batches") is not None:
            trainer.test_loop._max_batches = list(data["num_test_batches"])
        if data.get("num_predict_batches") is not None:
            trainer.predict_loop.max_batches = list(data["num_predict_batches"])
        metrics = dict(data.get("metrics") or {})
        if self._cost is not None:  # what the run has cost so far, in the bar beside the loss
            metrics["cost_usd"] = round(float(self._cost["spent_usd"]), 2)
        trainer._logger_connector._progress_bar_metrics = metrics

    def _progress(self, data: dict[str, Any]) -> None:
        trainer, bar = self._trainer, self._bar
        if bar.is_disabled:
            return
        self._apply_state(data)
        module = trainer.lightning_module
        if not self._bar_ready:
            bar.setup(trainer, module, data.get("fn") or "fit")
            self._bar_ready = True
        hook = data["hook"]
        batch_idx, dataloader_idx = data.get("batch_idx"), data.get("dataloader_idx", 0)
        if hook == "on_train_batch_end":  # the only batch hook without a dataloader_idx
            bar.on_train_batch_end(trainer, module, None, None, batch_idx)
        elif hook.endswith("_batch_end"):
            getattr(bar, hook)(trainer, module, None, None, batch_idx, dataloader_idx)
        elif hook.endswith("_batch_start"):
            getattr(bar, hook)(trainer, module, None, batch_idx, dataloader_idx)
        else:
            getattr(bar, hook)(trainer, module)

    def close(self, status: str = "success") -> None:
        """End the bar and the loggers (``failed`` after a home callback raised)."""
        if self.home_error is not None:
            status = "failed"
        if self._bar is not None and self._bar_ready:
            self._bar.teardown(self._trainer, self._trainer.lightning_module, "fit")
        for logger in self._loggers:
            logger.finalize(status)
            logger.save()
