"""How fast the event stream brings a run home, and what streaming costs the training loop.

  latency   - from a worker's ``self.log(...)`` to the home logger's ``log_metrics`` call, p50 and p99,
              on the embedded cluster (targets: 50 ms and 250 ms)
  overhead  - the training loop's time (rank 0, on_train_start to on_train_end) for a loop that logs every step, with streaming on (a home logger getting
              every call) against the same loop with streaming off (target: under 2 %); and with the
              home progress bar drawn as well

    python bench/events.py [--steps 1500] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_proxy_lightning  # noqa: E402,F401
from gpu_proxy_lightning import RemoteStrategy  # noqa: E402


class TinyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        self.log("loss", loss)
        # Wall clock (home and workers share this machine's clock), modulo 1000 s: self.log stores a
        # float32, which keeps only ~2 minutes of precision at today's epoch seconds.
        self.log("sent_at", time.time() % 1000)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class LatencyLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.latencies: list[float] = []

    name = property(lambda self: "latency")
    version = property(lambda self: 0)

    def log_metrics(self, metrics, step=None):
        if "sent_at" in metrics:
            self.latencies.append((time.time() - metrics["sent_at"]) % 1000)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class NullLogger(Logger):
    """The workers' own logger in both cases, so Lightning's logging work is the same on each side."""

    name = property(lambda self: "null")
    version = property(lambda self: 0)

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class LoopTimer(L.Callback):
    """Times the training loop itself on rank 0 (no setup, no teardown) into a file home reads."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            Path(self.path).write_text(str(time.perf_counter() - self.started))


def loader(steps: int) -> DataLoader:
    x = torch.randn(steps * 2 * 4, 8)  # 2 workers x batch 4
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(steps: int, streaming: bool, progress_bar: bool = False) -> tuple[float, LatencyLogger]:
    """The training loop's time on rank 0 (the embedded cluster shares this filesystem)."""
    home = LatencyLogger()
    timing = Path(tempfile.mkdtemp()) / "loop_seconds"
    strategy = RemoteStrategy(home_loggers=[home] if streaming else None)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=1, log_every_n_steps=1,
                        logger=NullLogger(), enable_progress_bar=progress_bar, callbacks=[LoopTimer(str(timing))],
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(TinyModel(), loader(steps))
    return float(timing.read_text()), home


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fit(50, True)  # warm the worker processes
    on, off, with_bar, latencies = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all alike
        seconds, home = fit(args.steps, True)
        on.append(seconds)
        latencies += home.latencies
        off.append(fit(args.steps, False)[0])
        with_bar.append(fit(args.steps, True, progress_bar=True)[0])
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(f"latency self.log -> home logger over {len(latencies)} calls: p50 {p50:.1f} ms (target 50), "
          f"p99 {p99:.1f} ms (target 250)")
    ratio = statistics.median(on) / statistics.median(off)
    print(f"training loop with streaming {statistics.median(on):.2f} s vs without {statistics.median(off):.2f} s "
          f"({args.steps} steps, logging every step): {ratio:.3f}x, overhead {100 * (ratio - 1):+.1f} % (target < 2 %)")
    bar_ratio = statistics.median(with_bar) / statistics.median(off)
    print(f"  ... and with the home progress bar drawn too: {statistics.median(with_bar):.2f} s, {bar_ratio:.3f}x "
          "(home shares this machine's 2 cores with the workers here; on a remote cluster it does not)")


if __name__ == "__main__":
    main()
