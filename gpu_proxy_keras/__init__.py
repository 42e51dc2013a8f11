"""Keras on remote GPUs: ``RemoteFit(model, ...).fit(...)`` trains on a Ray cluster, results at home."""
from gpu_proxy import version_gates

version_gates.check("keras")  # the private parts of Keras this package uses (keras.src): at import, not mid-run

from gpu_proxy_keras.remote_fit import RemoteFit

__all__ = ["RemoteFit"]
