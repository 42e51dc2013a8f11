"""Lightning on remote GPUs: ``import gpu_proxy_lightning`` registers ``strategy="remote_gpu"``.

It is registered with ``lightning.pytorch`` and, when installed, ``pytorch_lightning``.
"""
from lightning.pytorch.strategies import StrategyRegistry

from gpu_proxy_lightning import pl_mirror, remote_accelerator, tensor_buffers  # noqa: F401  (tensors out of band)
from gpu_proxy_lightning import worker_reset  # noqa: F401  (a pooled worker puts torch back after a run)
from gpu_proxy_lightning.home_callbacks import HomeCallback
from gpu_proxy_lightning.strategy import RemoteStrategy, register
from gpu_proxy_lightning.cluster_consolidation import consolidate_on_cluster  # the helpers of sharded runs
from gpu_proxy_lightning.sharded_checkpoints import consolidate_checkpoint, read_full_checkpoint
from gpu_proxy_lightning.tune import TuneReportCallback, trial_resources  # Ray Tune imported only when used

register(StrategyRegistry)
remote_accelerator.install()
pl_mirror.register_in_pytorch_lightning()

__all__ = ["HomeCallback", "RemoteStrategy", "TuneReportCallback", "consolidate_checkpoint", "consolidate_on_cluster",
           "read_full_checkpoint", "trial_resources"]
