"""Backend-native tensors in data arguments become numpy arrays at home, before they are shipped.

Why: Keras' own ``fit`` takes ``tf.Tensor``, JAX and torch arrays and pandas frames, but unpickling
a TensorFlow tensor on a worker starts TensorFlow's runtime, and a multi-worker run must make its
``MultiWorkerMirroredStrategy`` first ("Collective ops must be configured at program startup");
a JAX array would start JAX before ``jax.distributed``. Numpy arrays are what Keras turns them into
anyway (its array data adapter), they shard by rows and need no framework to unpickle. Sparse and
ragged tensors have no such dense twin and are refused here, naming what to pass instead.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gpu_proxy.errors import ConfigurationError

_FRAMEWORKS = ("tensorflow", "jax", "jaxlib", "torch", "pandas")


def to_numpy(name: str, value: Any) -> Any:
    """``value`` with every backend-native tensor (at any depth of dicts, lists, tuples) as numpy."""
    if isinstance(value, dict):
        return {key: to_numpy(f"{name}[{key!r}]", item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [to_numpy(f"{name}[{index}]", item) for index, item in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples
    module = type(value).__module__.split(".")[0]
    if module not in _FRAMEWORKS or callable(value):  # a function that builds data runs on the workers
        return value
    kind = type(value).__name__
    if "Sparse" in kind or "Ragged" in kind or "BCOO" in kind or _is_sparse_torch(value):
        raise ConfigurationError(
            f"{name} is a {module} {kind}, which gpu_proxy_keras cannot ship to the workers as it is. "
            f"Pass it dense as a numpy array (e.g. tf.sparse.to_dense({name}).numpy()), or pass a "
            f"function that builds it on each worker ({name}=lambda: make_sparse_inputs()).")
    if module == "pandas":
        return value.to_numpy() if hasattr(value, "to_numpy") else value
    if module == "torch" and hasattr(value, "detach"):
        return value.detach().cpu().numpy()  # a GPU tensor at home, too
    if module in ("tensorflow", "jax", "jaxlib") and hasattr(value, "__array__") and \
            "Dataset" not in kind:  # datasets are refused by arguments.check_data with their own advice
        return np.asarray(value)
    return value


def _is_sparse_torch(value: Any) -> bool:
    layout = getattr(value, "layout", None)
    return type(value).__module__.startswith("torch") and layout is not None and "strided" not in str(layout)
