"""The launcher of :class:`RemoteStrategy`: the home side and the worker side of a launch.

Home (``launch``): ship the Trainer, the bound Trainer function and its arguments as one object,
run it on the cluster, relay the run's events to the home Trainer, and restore rank 0's results
into the home Trainer. Worker (``WorkerJob.__call__``): become one DDP rank, call the function,
collect what home needs.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.strategies.launchers.multiprocessing import _GlobalStateSnapshot
from lightning.pytorch.trainer.call import _interrupt
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from typing_extensions import override

from gpu_proxy import events, shipping
from gpu_proxy.dataplane.package import Package
from gpu_proxy.errors import ShippingError
from gpu_proxy.events import Event
from gpu_proxy.runs import RunSpec, WorkerContext, execute, values
from gpu_proxy.errors import RunInterrupted, RunStoppedError
from gpu_proxy.runs.home import submit_detached
from gpu_proxy.runs.restarts import Attempt, run_with_restarts
from gpu_proxy_lightning import checkpointing, predictions, process_group_store, sharding, worker_output
from gpu_proxy_lightning.checkpoint_io import AsyncFsspecCheckpointIO
from gpu_proxy_lightning.home_events import HomeEventHandler
from gpu_proxy_lightning.worker_events import RelayLogger, StopUnwind, WorkerEventCallback

SEED_ENV_VARS = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


class WorkerJob:
    """The payload every worker calls. Pickled once, with the Trainer it refers to."""

    def __init__(self, trainer: Any, function: Callable, args: tuple, kwargs: dict) -> None:
        self.trainer = trainer
        self.function = function
        self.args = args
        self.kwargs = kwargs
        # What seed_everything() and torch's flags set at home, as Lightning's spawn launcher carries it.
        self.global_state = _GlobalStateSnapshot.capture()
        self.seed_env = {k: os.environ[k] for k in SEED_ENV_VARS if k in os.environ}

    def __call__(self, ctx: WorkerContext) -> worker_output.WorkerOutput:
        self.global_state.restore()
        for key in SEED_ENV_VARS:
            os.environ.pop(key, None)
        os.environ.update(self.seed_env)
        trainer = self.trainer
        strategy = trainer.strategy
        strategy.enter_worker(ctx)
        if strategy.sharded is not None:
            sharding.install(trainer, strategy, ctx)  # trainer.strategy is now FSDP/ModelParallel/DeepSpeed
        added = [WorkerEventCallback(ctx)]
        recorder = predictions.PredictionRecorder() if trainer.state.fn == TrainerFn.PREDICTING else None
        if recorder:
            added.append(recorder)
        trainer.callbacks.extend(added)
        if isinstance(strategy.checkpoint_io, AsyncFsspecCheckpointIO) and ctx.rank == 0:
            strategy.checkpoint_io.on_commit = lambda url, meta: ctx.emit(events.CHECKPOINT, {"url": url, **meta})
        relay = RelayLogger(ctx) if strategy.home_loggers else None
        if relay:
            trainer.loggers = [*trainer.loggers, relay]
        # torch.distributed's store and gloo/NCCL sockets on loopback or the private interface (issue 20).
        store = process_group_store.serve(ctx)
        ctx.master_addr = store.address  # Lightning's DDP sets MASTER_ADDR from the environment's main_address
        interrupted = False
        try:
            # Credentials are the run's only: Ray reuses this process for later runs (see checkpointing).
            with checkpointing.run_storage_options(strategy.checkpoint_dir, strategy.storage_options):
                try:
                    results = self.function(*self.args, **self.kwargs)
                except StopUnwind as stop:
                    interrupted, results = True, None
                    _stop_like_local_ctrl_c(trainer, stop)
            trainer.callbacks = [c for c in trainer.callbacks if not any(c is a for a in added)]
            if relay:
                trainer.loggers = [lg for lg in trainer.loggers if lg is not relay]
            output = worker_output.collect(trainer, results, ctx.rank, recorder.recorded if recorder else None)
            output.interrupted = interrupted
            return output
        finally:
            # The process is pooled for later runs: leave no process group and no store behind.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            store.close()


def _stop_like_local_ctrl_c(trainer: Any, stop: KeyboardInterrupt) -> None:
    """What Lightning does on Ctrl-C locally, on every rank at the same step, plus a last checkpoint."""
    _interrupt(trainer, stop)  # state INTERRUPTED, on_exception hooks, loggers finalized
    callback = trainer.checkpoint_callback
    if trainer.state.fn == TrainerFn.FITTING and callback is not None and getattr(callback, "dirpath", None):
        trainer.save_checkpoint(f"{callback.dirpath.rstrip('/')}/interrupted.ckpt")  # a collective: all ranks
    trainer._teardown()


def _finish_like_should_stop(trainer: Any) -> None:
    """The home Trainer as a local one that ``trainer.should_stop`` ended: finished, not interrupted.

    The ranks stopped through the run's stop request (as on Ctrl-C, within ``STOP_CHECK_EVERY``
    batches of the hook that set it); home only tells them apart by who asked."""
    trainer.state.status = TrainerStatus.FINISHED
    trainer.state.stage = None
    trainer.should_stop = True


class RemoteLauncher(_Launcher):
    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy
        self._run_name: str | None = None  # the run executing now, at home

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return True  # cloudpickle ships notebook-defined code

    @override
    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        strategy = self._strategy
        continue_run = strategy.run_name is not None  # a run named by the user continues where it stopped
        storage = self._prepare_storage(trainer, function)  # fails here, before any worker starts
        if storage is not None:
            args, kwargs = storage.resolve_ckpt_path(function, args, kwargs, continue_run)
        if strategy.sharded is not None:
            strategy.home_memory_bytes = sharding.home_memory_bytes()  # for return_weights="auto", now
        spec = self._spec(trainer, function, args, kwargs)
        if strategy.detach:
            strategy.run_id = submit_detached(strategy.resolved_cluster(), spec)
            print(f"gpu-proxy: run {strategy.run_id} submitted; follow it with "
                  f"`gpu-proxy attach {strategy.run_id} --cluster <cluster>`")
            return None
        handler = HomeEventHandler(trainer, strategy.home_loggers)
        status = "failed"
        stopped: RunStoppedError | None = None
        interrupted: RunInterrupted | None = None
        try:
            try:
                outputs = self._run_with_restarts(spec, handler, storage, trainer, function, args, kwargs)
                status = "success"
            except RunStoppedError as stop:  # the cluster stopped it (budget): the state so far comes home
                stopped, outputs, status = stop, values(stop.outcomes), "success"
            except RunInterrupted as interrupt:  # Ctrl-C: as a local run, keep what was trained so far
                outputs = _values_or_none(interrupt.outcomes)
                if outputs is None:  # aborted (a second Ctrl-C): nothing came back to restore
                    raise
                interrupted = interrupt  # status stays "failed": what Lightning tells loggers on Ctrl-C
            except Exception as error:
                if handler.home_error is None:
                    raise
                raise handler.home_error from error  # the run failed while a home callback's stop ended it
        finally:
            handler.close(status)
        if trainer is None:
            if interrupted is not None:
                raise interrupted
            return outputs[0]
        worker_output.restore(trainer, outputs[0])
        self._name_weights_left_on_cluster(trainer, outputs[0], storage)
        if interrupted is not None:
            raise interrupted  # a KeyboardInterrupt: Lightning's Ctrl-C handling goes on from here
        if handler.home_error is not None:
            # A home callback raised (optuna.TrialPruned): as locally, the model holds the weights of
            # the step where the run stopped, and the exception leaves fit now that the workers are free.
            raise handler.home_error
        if stopped is not None and handler.stopped_by_callback:
            _finish_like_should_stop(trainer)  # a home callback set trainer.should_stop: fit returns
            return outputs[0].trainer_results
        if stopped is not None:
            latest = storage.latest() if storage is not None else None
            hint = (f" The newest checkpoint is {latest}; fit again with the same run_name to continue."
                    if latest else "")
            raise RunStoppedError(f"{stopped.reason}.{hint}", stopped.outcomes)
        if outputs[0].interrupted:
            raise KeyboardInterrupt("the remote run stopped at home's request")
        if trainer.state.fn == TrainerFn.PREDICTING:
            return predictions.merge(outputs) if outputs[0].returns_predictions else None
        return outputs[0].trainer_results

    def _name_weights_left_on_cluster(self, trainer: Any, output: Any, storage: Any) -> None:
        """A fit whose weights stayed on the cluster (return_weights): say where they are."""
        strategy = self._strategy
        strategy.weights_url = None
        if output.weights is not None or trainer.state.fn != TrainerFn.FITTING or strategy.return_weights is True:
            return
        callback = trainer.checkpoint_callback
        strategy.weights_url = ((getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", ""))
                                or (storage.latest() if storage is not None else None))
        where = (f"they are in {strategy.weights_url} (gpu_proxy_lightning.consolidate_checkpoint makes one file "
                 "of a sharded checkpoint)" if strategy.weights_url else "no checkpoint holds them; give the Trainer "
                 "a ModelCheckpoint and RemoteStrategy(checkpoint_dir=...) to keep them")
        print(f"gpu-proxy: the trained weights stayed on the cluster (return_weights={strategy.return_weights!r}); "
              f"{where}. strategy.weights_url names them.")

    def _spec(self, trainer: Any, function: Callable, args: tuple, kwargs: dict) -> RunSpec:
        strategy = self._strategy
        secrets: dict[str, str] = {}
        payload = self._ship(WorkerJob(trainer, function, args, kwargs), trainer, args, secrets)
        return RunSpec(payload=payload, secrets=secrets,
                       num_workers=strategy.worker_count(), resources_per_worker=strategy.worker_resources(),
                       home_grace_s=None if strategy.detach else strategy.home_grace_s, worker_pool="lightning",
                       keep_warm_s=strategy.keep_warm,
                       staging_dir=strategy.staging_url(), staging_options=strategy.storage_options,
                       result_bytes_hint=(0 if strategy.return_weights is False
                                          else _state_bytes(args[0] if args else None)))

    def _prepare_storage(self, trainer: Any, function: Callable) -> checkpointing.RunStorage | None:
        strategy = self._strategy
        if not strategy.checkpoint_dir or trainer is None:
            return None
        if checkpointing.is_fit(function) and strategy.run_name is None:
            strategy.run_name = checkpointing.new_run_name()
        storage = checkpointing.RunStorage(strategy.checkpoint_dir, strategy.run_name or "default",
                                           strategy.storage_options)
        storage.check()
        storage.configure(trainer)
        return storage

    def _run_with_restarts(self, spec: RunSpec, handler: HomeEventHandler, storage: Any, trainer: Any,
                           function: Callable, args: tuple, kwargs: dict) -> list[Any]:
        """Run; when a worker dies, start again from the newest committed checkpoint, up to max_failures."""
        def run(attempt: Attempt[str]) -> list[Any]:
            nonlocal spec
            if attempt.number > 1:  # a fit resumes from the checkpoint; other functions run again as given
                resumed = (checkpointing.with_ckpt_path(function, args, kwargs, attempt.resume_from)
                           if checkpointing.is_fit(function) else (args, kwargs))
                spec = self._spec(trainer, function, *resumed)
            self._run_name = spec.name
            return values(execute(self._strategy.resolved_cluster(), spec, handler.handle))

        def announce(attempt: Attempt[str]) -> None:
            handler.handle(Event(events.RESTART, {"attempt": attempt.number, "reason": attempt.after,
                                                  "resumed_from": attempt.resume_from}))

        return run_with_restarts(run, self._strategy.max_failures,
                                 storage.latest if storage is not None else None, announce)

    @staticmethod
    def _ship(job: WorkerJob, trainer: Any, args: tuple, secrets: dict[str, str]) -> Package:
        try:
            return shipping.pack(job, secrets=secrets)
        except ShippingError as error:
            raise ShippingError(_name_unshippable(trainer, args) or str(error)) from error.__cause__

    @override
    def kill(self, signum: Any) -> None:
        """Stop the run gracefully, as the cluster does when its budget is spent: every rank at the same
        step, ``interrupted.ckpt`` saved, the state so far brought home, ``RunStoppedError`` raised.

        Lightning's signal connector runs in the Trainer's process, which here is a worker: there
        Lightning's own SIGTERM handling already stops every rank's loops at the same step, and the
        processes are Ray's to end, so a worker does nothing. At home, anyone may call this (a SIGTERM
        handler of the user's, a watchdog thread) while ``fit`` runs.
        """
        cluster = self._strategy._resolved_cluster
        if self._strategy.is_remote_worker or cluster is None or self._run_name is None:
            return
        for control in cluster.active_runs():
            if control.run_name == self._run_name:
                control.request_stop(f"the run was stopped by signal {getattr(signum, 'name', signum)}")


def _values_or_none(outcomes: list[Any]) -> list[Any] | None:
    """Each rank's output, or None when the run ended without them (aborted, a worker lost)."""
    if not outcomes:
        return None
    try:
        return values(outcomes)
    except Exception:  # noqa: BLE001 - the interrupt is what the user must see, not a cancelled rank
        return None


def _state_bytes(module: Any) -> int:
    """The size of a module's state dict: about what rank 0 sends home after fit."""
    if not isinstance(module, torch.nn.Module):
        return 0
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def _name_unshippable(trainer: Any, args: tuple) -> str | None:
    """Say which of the user's objects cannot be pickled, in the user's terms."""
    candidates: list[tuple[str, Any]] = []
    module = args[0] if args else None
    if module is not None:
        candidates.append((f"the LightningModule {type(module).__name__}", module))
    if trainer is not None:
        candidates += [(f"the callback {type(c).__name__}", c) for c in trainer.callbacks]
        candidates += [(f"the logger {type(lg).__name__}", lg) for lg in trainer.loggers]
    for arg in args[1:]:
        if arg is not None:
            candidates.append((f"the argument {type(arg).__name__}", arg))
    for label, obj in candidates:
        path = shipping.find_unpicklable(obj, label)
        if path:
            return (f"{path} cannot be sent to the remote workers (it cannot be pickled). Hold such "
                    "resources (locks, open files, sockets, generators) outside it, or create them in "
                    "a setup hook.")
    return None
