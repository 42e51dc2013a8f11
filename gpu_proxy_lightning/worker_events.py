"""The worker-side Lightning callback that feeds the run's event stream."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from gpu_proxy.runs import WorkerContext


class WorkerEventCallback(Callback):
    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Home draws the progress bar from the event stream; a worker's bar would print twice.
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()
