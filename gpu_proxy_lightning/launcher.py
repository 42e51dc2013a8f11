"""The launcher of :class:`RemoteStrategy`: the home side and the worker side of a launch.

Home (``launch``): ship the Trainer, the bound Trainer function and its arguments as one object,
run it on the cluster, relay the run's events to the home Trainer, and restore rank 0's results
into the home Trainer. Worker (``WorkerJob.__call__``): become one DDP rank, call the function,
collect what home needs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.trainer.states import TrainerFn

from gpu_proxy import shipping
from gpu_proxy.errors import ShippingError
from gpu_proxy.runs import RunSpec, WorkerContext, execute, values
from gpu_proxy_lightning import predictions, worker_output
from gpu_proxy_lightning.home_events import HomeEventHandler


class WorkerJob:
    """The payload every worker calls. Pickled once, with the Trainer it refers to."""

    def __init__(self, trainer: Any, function: Callable, args: tuple, kwargs: dict) -> None:
        self.trainer = trainer
        self.function = function
        self.args = args
        self.kwargs = kwargs

    def __call__(self, ctx: WorkerContext) -> worker_output.WorkerOutput:
        trainer = self.trainer
        trainer.strategy.enter_worker(ctx)
        from gpu_proxy_lightning.worker_events import WorkerEventCallback

        trainer.callbacks.append(WorkerEventCallback(ctx))
        recorder = None
        if trainer.state.fn == TrainerFn.PREDICTING:
            recorder = predictions.PredictionRecorder()
            trainer.callbacks.append(recorder)
        try:
            results = self.function(*self.args, **self.kwargs)
            trainer.callbacks = [c for c in trainer.callbacks if c is not recorder
                                 and not isinstance(c, WorkerEventCallback)]
            return worker_output.collect(trainer, results, ctx.rank,
                                         recorder.recorded if recorder else None)
        finally:
            # Ray reuses this process for later runs: leave no process group behind.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


class RemoteLauncher(_Launcher):
    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy

    @property
    def is_interactive_compatible(self) -> bool:
        return True  # cloudpickle ships notebook-defined code

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        strategy = self._strategy
        spec = RunSpec(payload=self._ship(WorkerJob(trainer, function, args, kwargs), trainer, args),
                       num_workers=strategy.worker_count(), resources_per_worker=strategy.worker_resources())
        handler = HomeEventHandler(trainer)
        try:
            outputs = values(execute(strategy.resolved_cluster(), spec, handler.handle))
        finally:
            handler.close()
        if trainer is None:
            return outputs[0]
        worker_output.restore(trainer, outputs[0])
        if trainer.state.fn == TrainerFn.PREDICTING:
            return predictions.merge(outputs) if outputs[0].returns_predictions else None
        return outputs[0].trainer_results

    @staticmethod
    def _ship(job: WorkerJob, trainer: Any, args: tuple) -> bytes:
        try:
            return shipping.dumps(job)
        except ShippingError as error:
            raise ShippingError(_name_unshippable(trainer, args) or str(error)) from error.__cause__

    def kill(self, signum: Any) -> None:
        pass  # the run's workers are stopped by the run itself (see gpu_proxy.runs.home)


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
