"""Which ``tf.distribute`` strategy a worker trains under, and the TF_CONFIG that multi-worker needs."""
from __future__ import annotations

import json
from typing import Any


def tf_config(addresses: list[str], rank: int) -> str:
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": rank}})


def tensorflow_strategy(world_size: int) -> Any:
    """MultiWorkerMirroredStrategy for several workers (TF_CONFIG set by the caller), MirroredStrategy
    for one worker with several GPUs, else None (Keras' default: no strategy)."""
    import tensorflow as tf

    if world_size > 1:
        from gpu_proxy_keras import _mwms_fix

        _mwms_fix.apply()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return None
