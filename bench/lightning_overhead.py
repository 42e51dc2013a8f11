"""What remote_gpu costs over running the same DDP job locally, measured side by side.

One job (the digits MLP, 2 CPU workers, 2 epochs) four ways:
  remote_gpu   - this project, on the embedded Ray cluster
  by_address   - this project, on a `ray start --head` cluster on loopback given by address (the
                 remote path: a run server, warm workers); the cluster is kept for the whole bench
  ddp_spawn    - Lightning's own multi-process launcher on this machine (the reference)
  ray_train    - Ray Train V2 driven directly (TorchTrainer + RayDDPStrategy)

"warm": fit() wall time inside one process whose Ray cluster is already up (median of --repeats).
"cold": wall time of a fresh `python bench/lightning_overhead.py --only MODE` process, imports
included; the embedded cluster starts in it, the cluster by address is the kept one.

    python bench/lightning_overhead.py [--repeats 3] [--cold-repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MODES = ("remote_gpu", "by_address", "ddp_spawn", "ray_train")
ADDRESS_ENV = "GPU_PROXY_BENCH_ADDRESS"
TRAINER_ARGS = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False)


def fit_remote_gpu(cluster: str | None = None) -> float:
    import lightning as L

    from examples.lightning_digits import DigitsClassifier, DigitsData
    from gpu_proxy_lightning import RemoteStrategy

    trainer = L.Trainer(strategy=RemoteStrategy(cluster=cluster), accelerator="cpu", devices=2, **TRAINER_ARGS)
    start = time.perf_counter()
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    return time.perf_counter() - start


def fit_ddp_spawn() -> float:
    import lightning as L

    from examples.lightning_digits import DigitsClassifier, DigitsData

    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, **TRAINER_ARGS)
    start = time.perf_counter()
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())
    return time.perf_counter() - start


def _ray_train_loop(config: dict) -> None:
    import lightning as L
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from examples.lightning_digits import DigitsClassifier, DigitsData

    trainer = L.Trainer(strategy=RayDDPStrategy(), plugins=[RayLightningEnvironment()], accelerator="cpu",
                        devices="auto", **TRAINER_ARGS)
    trainer = prepare_trainer(trainer)
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())


def fit_ray_train() -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gpu_proxy.runs.pool import current_pool

    current_pool().clear()  # remote_gpu's warm workers hold the CPUs, and only our own runs make them yield

    storage = Path("/tmp/gpu-proxy-bench-ray-train")
    trainer = TorchTrainer(_ray_train_loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=RunConfig(storage_path=str(storage), name=f"bench-{os.getpid()}"))
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def fit_by_address() -> float:
    return fit_remote_gpu(os.environ[ADDRESS_ENV])


FITS = {"remote_gpu": fit_remote_gpu, "by_address": fit_by_address, "ddp_spawn": fit_ddp_spawn,
        "ray_train": fit_ray_train}


def start_cluster() -> None:
    from gpu_proxy.clusters.local import default_local_cluster

    default_local_cluster().start()  # ray_train uses the same in-process Ray


def cold(mode: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--only", mode], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="warm fits per mode (median)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="fresh scripts per mode (median)")
    parser.add_argument("--only", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        if args.only == "ray_train":
            start_cluster()
        FITS[args.only]()
        return

    from tests.support.ray_head import start_ray_head, stop_ray_head

    head = start_ray_head(num_cpus=2)
    os.environ[ADDRESS_ENV] = head.dashboard_url
    os.environ["RAY_AUTH_TOKEN_PATH"] = head.token_path  # where RayCluster finds the token (as a user's would)
    try:
        run_all(args.repeats, args.cold_repeats)
    finally:
        stop_ray_head(head)


def run_all(repeats: int, cold_repeats: int) -> None:
    start_cluster()
    warm: dict[str, list[float]] = {mode: [] for mode in MODES}
    for mode in MODES:
        FITS[mode]()  # first run: worker processes import torch and Lightning
        for _ in range(repeats):
            warm[mode].append(FITS[mode]())
    from gpu_proxy.clusters.local import default_local_cluster

    # This process's own cluster (and its idle warm workers) would load the machine under the fresh
    # scripts; the kept cluster by address stays up, as a user's kept cluster does.
    default_local_cluster().stop()
    cold_samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(cold_repeats):  # interleaved, so that every mode meets the same load
        for mode in MODES:
            cold_samples[mode].append(cold(mode))
    cold_times = {mode: statistics.median(times) for mode, times in cold_samples.items()}

    w = {mode: statistics.median(times) for mode, times in warm.items()}
    print(f"{'':12}{'warm fit() s':>14}{'cold script s':>15}")
    for mode in MODES:
        print(f"{mode:12}{w[mode]:>14.2f}{cold_times[mode]:>15.2f}")
    print(f"remote_gpu / ddp_spawn : warm {w['remote_gpu'] / w['ddp_spawn']:.2f}x (target <= 1.3), "
          f"cold {cold_times['remote_gpu'] / cold_times['ddp_spawn']:.2f}x (target <= 1.2)")
    print(f"by_address / ddp_spawn : warm {w['by_address'] / w['ddp_spawn']:.2f}x (target <= 0.3), "
          f"fresh script, kept cluster {cold_times['by_address'] / cold_times['ddp_spawn']:.2f}x (target <= 0.8)")
    print(f"remote_gpu / ray_train : warm {w['remote_gpu'] / w['ray_train']:.2f}x, "
          f"cold {cold_times['remote_gpu'] / cold_times['ray_train']:.2f}x")


if __name__ == "__main__":
    main()
