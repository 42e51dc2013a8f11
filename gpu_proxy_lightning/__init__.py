"""Lightning on remote GPUs: ``import gpu_proxy_lightning`` registers ``strategy="remote_gpu"``.

It is registered with ``lightning.pytorch`` and, when installed, ``pytorch_lightning``. Ray Tune's
helpers (``TuneReportCallback``, ``trial_resources``) load on first use: they need ``gpu-proxy[tune]``.
"""
from typing import Any

from gpu_proxy import version_gates

version_gates.check("lightning")  # the private parts of Lightning and torch this package uses: at import, not mid-run
version_gates.check("torch")

from lightning.pytorch.strategies import StrategyRegistry

from gpu_proxy_lightning import pl_mirror, remote_accelerator, tensor_buffers  # noqa: F401  (tensors out of band)
from gpu_proxy_lightning import worker_reset  # noqa: F401  (a pooled worker puts torch back after a run)
from gpu_proxy_lightning.home_callbacks import HomeCallback
from gpu_proxy_lightning.strategy import RemoteStrategy
from gpu_proxy_lightning.cluster_consolidation import consolidate_on_cluster  # the helpers of sharded runs
from gpu_proxy_lightning.sharded_checkpoints import consolidate_checkpoint, read_full_checkpoint

RemoteStrategy.register_strategies(StrategyRegistry)
remote_accelerator.install()
pl_mirror.register_in_pytorch_lightning()

_TUNE = ("TuneReportCallback", "trial_resources")  # gpu_proxy_lightning.tune: Ray Tune, the `tune` extra


def __getattr__(name: str) -> Any:
    if name in _TUNE:
        from gpu_proxy_lightning import tune

        return getattr(tune, name)
    raise AttributeError(f"module 'gpu_proxy_lightning' has no attribute {name!r}")


# Tune's names stay out of __all__: `from gpu_proxy_lightning import *` must not need the `tune` extra.
__all__ = ["HomeCallback", "RemoteStrategy", "consolidate_checkpoint", "consolidate_on_cluster", "read_full_checkpoint"]
