"""Lightning on remote GPUs: ``import gpu_proxy_lightning`` registers ``strategy="remote_gpu"``."""
from lightning.pytorch.strategies import StrategyRegistry

from gpu_proxy_lightning import remote_accelerator
from gpu_proxy_lightning.strategy import RemoteStrategy, register

register(StrategyRegistry)
remote_accelerator.install()

__all__ = ["RemoteStrategy"]
