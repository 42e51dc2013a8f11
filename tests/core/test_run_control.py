"""A cluster can add events to the runs it executes and stop them gracefully (a spent budget)."""
from __future__ import annotations

import threading
import time

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

import gpu_proxy_lightning  # noqa: F401
from gpu_proxy import LocalCluster, RunStoppedError, events
from gpu_proxy.events import Event
from gpu_proxy.storage import list_committed
from gpu_proxy_lightning import RemoteStrategy
from tests.lightning_project.models import DigitsData, DigitsModel
from tests.lightning.test_lightning_live_events import Endless, TimedLogger

pytestmark = pytest.mark.usefixtures("local_cluster")


class MeteredCluster(LocalCluster):
    """The embedded cluster with a money meter, as a cloud cluster has: it adds a cost event to each
    run every tick and stops the runs once ``stop_after_ticks`` ticks have passed."""

    def __init__(self, stop_after_ticks: int, tick_s: float = 1.0) -> None:
        super().__init__()
        self.stop_after_ticks, self.tick_s = stop_after_ticks, tick_s
        self.ticks = 0
        self._meter: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        if self._meter is None:
            self._meter = threading.Thread(target=self._run_meter, daemon=True)
            self._meter.start()

    def _run_meter(self) -> None:
        while self.ticks < self.stop_after_ticks:  # no tick after the stop: a slow stop must not be billed again
            time.sleep(self.tick_s)
            runs = self.active_runs()
            if not runs:
                continue
            self.ticks += 1
            for control in runs:
                control.post(Event(events.COST, {"spent_usd": self.ticks * 0.5, "usd_per_hour": 1800.0,
                                                 "budget_usd": 2.0}))
                if self.ticks == self.stop_after_ticks:
                    control.request_stop("budget_usd=2 reached: $2.00 spent")

    def __reduce__(self):  # the strategy travels to the workers; the meter stays home
        return (LocalCluster, ())


def test_a_cluster_stops_a_fit_gracefully_with_a_checkpoint_and_the_state_comes_home(tmp_path):
    cluster = MeteredCluster(stop_after_ticks=4, tick_s=2.0)
    home = TimedLogger()
    strategy = RemoteStrategy(cluster=cluster, checkpoint_dir=f"file://{tmp_path}/runs", run_name="budget",
                              home_loggers=[home])
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=1000, logger=False,
                        callbacks=[ModelCheckpoint(save_last=True)], enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(RunStoppedError) as info:
        trainer.fit(Endless(), datamodule=DigitsData(limit=400))
    message = str(info.value)
    assert "budget_usd=2 reached" in message and "run_name" in message
    costs = [metrics["cost_usd"] for _, metrics, _ in home.calls if "cost_usd" in metrics]
    assert costs == [0.5, 1.0, 1.5, 2.0]
    assert trainer.state.status == "interrupted"
    assert 0 < trainer.global_step and trainer.current_epoch < 999  # the trained state came home
    committed = list_committed(f"file://{tmp_path}/runs/budget/checkpoints")
    assert any(url.endswith("interrupted.ckpt") for url in committed)
    resumed = DigitsModel.load_from_checkpoint(next(u for u in committed if u.endswith("interrupted.ckpt")))
    assert isinstance(resumed, DigitsModel)


def test_a_sigint_raised_on_another_thread_is_a_stop_request_while_no_event_comes():
    """The kernel gives a thread-raised SIGINT to that thread; Python runs the handler on the main thread,
    which must not sleep in the queue until the run's next event (a stopping run sends few)."""
    import signal

    from gpu_proxy.runs.control import RunControl, StopRequest

    control = RunControl(on_event=lambda event: None)
    threading.Timer(0.3, signal.raise_signal, args=(signal.SIGINT,)).start()
    threading.Timer(10, control.finish).start()  # without the wake-up, the first item would come only then
    started = time.monotonic()
    first = next(control.items())
    assert isinstance(first, StopRequest) and first.reason is None and control.interrupted
    assert time.monotonic() - started < 5
