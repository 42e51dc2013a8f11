"""Keras on remote GPUs: ``RemoteFit(model, ...).fit(...)`` trains on a Ray cluster, results at home."""
from gpu_proxy_keras.remote_fit import RemoteFit

__all__ = ["RemoteFit"]
