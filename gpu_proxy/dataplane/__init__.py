"""The data plane: how a run's bulky bytes travel between home and a cluster (see ``base.py``)."""
from gpu_proxy.dataplane.base import INLINE_LIMIT, ClusterTransport, DataPlane
from gpu_proxy.dataplane.package import Package, PackageError, StoredFile

__all__ = ["INLINE_LIMIT", "ClusterTransport", "DataPlane", "Package", "PackageError", "StoredFile"]
