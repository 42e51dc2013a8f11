"""Home -> cluster values through the Jobs HTTP API: the one channel home has to a remote cluster.

The API has no route for messages, but it stores runtime-env packages in the cluster's GCS key-value
store by name (``PUT /api/packages/gcs/<name>``, token-checked like every dashboard route); the job
driver reads them through ``ray.experimental.internal_kv``. Home's heartbeat and the run's secrets
travel this way.
"""
from __future__ import annotations

from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.clusters.dashboard import DASHBOARD_RETRIES, DashboardClient
from gpu_proxy.http_transport import RetryPolicy


def package_name(run_name: str, what: str) -> str:
    return f"_gpu_proxy_{what}_{run_name}.zip"


def kv_key(run_name: str, what: str) -> bytes:
    return f"gcs://{package_name(run_name, what)}".encode()


def put_value(endpoint: Endpoint, run_name: str, what: str, value: bytes, timeout_s: float = 10.0,
              policy: RetryPolicy = DASHBOARD_RETRIES) -> None:
    """Store ``value`` under the run's ``what`` key, retried as ``policy`` says (raises ``HTTPCallError``,
    an ``OSError``, on failure)."""
    DashboardClient(endpoint, timeout_s, policy).put_package(package_name(run_name, what), value, timeout_s)


def take_value(run_name: str, what: str) -> bytes | None:
    """Driver side: read the run's ``what`` value and delete it from the store."""
    from ray.experimental import internal_kv

    key = kv_key(run_name, what)
    value = internal_kv._internal_kv_get(key)
    if value is not None:
        internal_kv._internal_kv_del(key)
    return value


def read_value(run_name: str, what: str) -> bytes | None:
    """Driver side: read the ``what`` value under ``run_name`` and leave it (a value home overwrites,
    such as the cost meter's reading); ``None`` when absent or when Ray's key-value store is not here."""
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        return None
    return internal_kv._internal_kv_get(kv_key(run_name, what))


METER = ("cluster", "meter")  # (run_name, what) of the cost meter's reading: one key per cluster, not per run
