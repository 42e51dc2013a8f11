"""A narrow fix that lets Keras 3 train under TensorFlow's MultiWorkerMirroredStrategy.

Keras 3 does not support several workers under ``MultiWorkerMirroredStrategy`` (keras issue 20585).
Two places break, both in ``keras/src/backend/tensorflow/trainer.py``:

- ``TensorFlowTrainer._maybe_symbolic_build`` builds the model from the first distributed batch by
  reducing it across *all workers* with ``strategy.reduce("MEAN", batch, axis=None)``; under several
  workers that reduction fails ("Attempt to convert a value (PerReplica...) to a Tensor"). Building
  only needs the batch's shapes, so this worker's own first replica's batch is enough.
- ``reduce_per_replica`` reduces every step's metric logs with ``axis=0`` in multi-worker mode,
  which is wrong for the scalar logs Keras produces; ``axis=None`` averages them across replicas.

The fix replaces those two functions and changes nothing else. It is applied only on a worker of a
multi-worker run, and only with the Keras and TensorFlow versions of ``gpu_proxy.version_gates``, the
pins of pyproject.toml (``tests/keras/test_keras_multi_worker.py`` proves it: a 2-worker History equals a
1-worker, 2-replica one).
"""
from __future__ import annotations

from typing import Any

from gpu_proxy import version_gates

ONE_WORKER = "or use num_workers=1 (one worker can still use several GPUs through MirroredStrategy)"

_applied = False


def versions() -> tuple[str, str]:
    import keras
    import tensorflow as tf

    return keras.__version__, tf.__version__


def is_tested_version() -> bool:
    keras_version, tf_version = versions()
    return version_gates.in_range("keras", keras_version) and version_gates.in_range("tensorflow", tf_version)


def apply() -> None:
    """Patch Keras' TensorFlow trainer for multi-worker runs; refuse untested versions."""
    global _applied
    if _applied:
        return
    keras_version, tf_version = versions()  # this worker's: the cluster may have other versions than home
    version_gates.check("keras", keras_version, hint=ONE_WORKER)
    version_gates.check("tensorflow", tf_version, hint=ONE_WORKER)
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original_reduce = tf_trainer.reduce_per_replica

    def maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> None:
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda value: self.distribute_strategy.experimental_local_results(value)[0]
                    if isinstance(value, tf.distribute.DistributedValues) else value,
                    next(batches))
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return tf.nest.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return original_reduce(values, strategy, reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _applied = True
