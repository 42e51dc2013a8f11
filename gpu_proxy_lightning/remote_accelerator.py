"""A home-side stand-in for the workers' GPUs, so ``accelerator="gpu"`` works on a laptop without one.

Lightning validates ``accelerator="gpu"``/``"cuda"`` and ``devices=N`` against the local machine
(``_AcceleratorConnector._choose_gpu_accelerator_backend`` raises "No supported gpu backend
found!"). With our strategy the devices are the workers', so at home we swap in
:class:`RemoteCUDAAccelerator`, which is always available and only counts devices. The swap is a
narrow wrapper around one private connector method, applied only to Lightning versions we test
(see :data:`TESTED_LIGHTNING`), and only when the strategy is ours.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator
from packaging.version import Version

TESTED_LIGHTNING = (Version("2.6.0"), Version("2.7.0"))  # [low, high)
GPU_FLAGS = ("gpu", "cuda")


class RemoteCUDAAccelerator(Accelerator):
    """The CUDA devices of the remote workers, as seen from home. Never runs anything here."""

    def setup_device(self, device: torch.device) -> None:
        raise RuntimeError("RemoteCUDAAccelerator only stands in at home; workers use CUDAAccelerator.")

    def teardown(self) -> None:
        pass

    @staticmethod
    def parse_devices(devices: Any) -> int:
        if isinstance(devices, (list, tuple)):
            return len(devices)
        if isinstance(devices, str):
            devices = devices.strip()
            if devices == "-1":
                raise ValueError('devices="-1" (all local GPUs) has no meaning for remote workers; give a number.')
            return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
        if devices == -1 or devices is None:
            raise ValueError("devices=-1 (all local GPUs) has no meaning for remote workers; give a number.")
        return int(devices)

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device("cuda", i) for i in range(RemoteCUDAAccelerator.parse_devices(devices))]

    @staticmethod
    def auto_device_count() -> int:
        return 1

    @classmethod
    def name(cls) -> str:
        return "remote_cuda"

    @staticmethod
    def is_available() -> bool:
        return True

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return {}


def _is_remote_strategy(flag: Any) -> bool:
    from gpu_proxy_lightning.strategy import STRATEGY_NAMES, RemoteStrategy

    return isinstance(flag, RemoteStrategy) or (isinstance(flag, str) and flag in STRATEGY_NAMES)


def _wrap(connector_cls: type) -> None:
    original = connector_cls._check_config_and_set_final_flags
    if getattr(original, "_gpu_proxy_wrapped", False):
        return

    @functools.wraps(original)
    def check_config_and_set_final_flags(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if _is_remote_strategy(self._strategy_flag) and self._accelerator_flag in GPU_FLAGS:
            self._accelerator_flag = RemoteCUDAAccelerator()

    check_config_and_set_final_flags._gpu_proxy_wrapped = True  # type: ignore[attr-defined]
    connector_cls._check_config_and_set_final_flags = check_config_and_set_final_flags


def install() -> bool:
    """Wrap the Trainer's accelerator connector; False (with a warning) on an untested Lightning."""
    import lightning

    if not TESTED_LIGHTNING[0] <= Version(lightning.__version__) < TESTED_LIGHTNING[1]:
        warnings.warn(f"gpu-proxy is tested with lightning {TESTED_LIGHTNING[0]}..<{TESTED_LIGHTNING[1]}, not "
                      f"{lightning.__version__}: accelerator='gpu' needs a local GPU with this version.")
        return False
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    _wrap(_AcceleratorConnector)
    return True
