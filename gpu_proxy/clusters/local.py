"""The embedded local Ray cluster: started in this process on first use, reused after."""
from __future__ import annotations

import atexit
import logging
import threading
from typing import TYPE_CHECKING, Any

import ray

from gpu_proxy.clusters.base import Cluster
from gpu_proxy.clusters.embedded_ray import end_ray_processes_without_grace, start_ray
from gpu_proxy.errors import ConfigurationError

if TYPE_CHECKING:
    from gpu_proxy.dataplane.base import DataPlane
    from gpu_proxy.runs.control import RunControl
    from gpu_proxy.runs.spec import RunSpec

log = logging.getLogger(__name__)
# Two locks, so that asking for the cluster or for a background start never waits for Ray's start
# (seconds): ``_start_lock`` is held through ``ray.init``/``ray.shutdown``; ``_lock`` only for the
# process-wide default and the background thread's handle.
_lock = threading.Lock()
_start_lock = threading.Lock()
_default: "LocalCluster | None" = None


class LocalCluster(Cluster):
    """A Ray cluster on this machine, with this machine's CPUs and GPUs.

    If Ray is already initialised in this process (by the user or an earlier run), that cluster
    is used as it is. Token auth is on (``RAY_AUTH_MODE=token``) unless the user turned it off.
    """

    def __init__(self, num_cpus: int | None = None, num_gpus: int | None = None,
                 include_dashboard: bool = False) -> None:
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigurationError(f"LocalCluster({name}={value!r}): give a whole number >= 0, or None "
                                         "for what this machine has.")
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.include_dashboard = include_dashboard
        self._started_here = False
        self._background: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        with _start_lock:
            if ray.is_initialized():
                return
            if threading.current_thread() is threading.main_thread():
                self._init_ray()
            else:
                self._init_ray_on_a_keeper_thread()
            self.owns_nodes = self._started_here = True

    def _init_ray_on_a_keeper_thread(self) -> None:
        """``ray.init`` on a thread that lives until :meth:`stop`.

        Ray ties GCS and raylet to the *thread* that started them (``PR_SET_PDEATHSIG``): started from
        a thread that then ends (a notebook's worker thread, an Optuna trial, the background start),
        they would be killed with it and the next run would wait 60 s for a GCS that is gone.
        """
        started, failure = threading.Event(), []
        stopped = self._stopped

        def keep() -> None:
            try:
                self._init_ray()
            except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread
                failure.append(exc)
                return
            finally:
                started.set()
            stopped.wait()

        threading.Thread(target=keep, name="gpu-proxy-ray-keeper", daemon=True).start()
        started.wait()
        if failure:
            raise failure[0]

    def _init_ray(self) -> None:
        start_ray(num_cpus=self.num_cpus, num_gpus=self.num_gpus, include_dashboard=self.include_dashboard)
        # Runs before Ray's own exit hook (registered when Ray was imported; atexit is last-in first-out),
        # which first sleeps 0.5 s "so that log messages finish printing": this cluster prints none
        # (log_to_driver=False), and every script's exit paid it.
        atexit.register(self._stop_at_exit)

    def _stop_at_exit(self) -> None:
        if self._started_here and ray.is_initialized():
            end_ray_processes_without_grace()
            self.stop()

    def __getstate__(self) -> dict[str, Any]:
        # Threads and events cannot travel (clusters ride in strategies).
        return {**self.__dict__, "_background": None, "_stopped": threading.Event()}

    def start_in_background(self) -> None:
        """Start the cluster on a thread of its own now, so it is up by the first run (which waits for it).

        Ray's start (4-8 s on a small machine) then overlaps the user's script building its model
        and data. A failure here is not lost: the first run's ``start()`` tries again and raises it.
        """
        with _lock:
            if ray.is_initialized() or self._background is not None:
                return
            self._background = threading.Thread(target=self._start_quietly, name="gpu-proxy-ray-start", daemon=True)
            self._background.start()

    def warm_in_background(self, spec: "RunSpec", modules: tuple[str, ...] = ()) -> None:
        """Start worker processes for runs like ``spec`` on a thread of their own, once the cluster
        is up, and import ``modules`` in them: the first run then finds them warm (see
        :meth:`gpu_proxy.runs.pool.WorkerPool.prewarm`). Only for a cluster this process starts in
        the background: a Ray the user or a test session started has its own plans for its CPUs."""
        self.start_in_background()
        if self._background is None:
            return

        def warm() -> None:
            from gpu_proxy.runs.pool import current_pool

            self._start_quietly()
            if ray.is_initialized():
                current_pool().prewarm(spec, modules)

        threading.Thread(target=warm, name="gpu-proxy-prewarm", daemon=True).start()

    def _start_quietly(self) -> None:
        try:
            self.start()  # on a keeper thread: this one may end
        except Exception:  # noqa: BLE001 - start() from the run raises it where the user sees it
            log.debug("the embedded cluster did not start in the background", exc_info=True)

    def data_plane(self, spec: "RunSpec") -> "DataPlane":
        from gpu_proxy.dataplane.local import LocalFolderPlane

        size = spec.payload.nbytes if spec.payload is not None else 0
        return LocalFolderPlane(spec.name, size_hint=size + spec.result_bytes_hint)

    def execute(self, spec: "RunSpec", control: "RunControl") -> list[dict[str, Any]]:
        from gpu_proxy.runs.in_process import execute_in_process

        return execute_in_process(spec, control)

    def resources(self) -> dict[str, float]:
        self.start()
        return dict(ray.cluster_resources())

    def dashboard_url(self) -> str | None:
        context = ray.get_runtime_context() if ray.is_initialized() else None
        url = getattr(getattr(context, "worker", None), "dashboard_url", None) if context else None
        return f"http://{url}" if url else None

    def stop(self) -> None:
        with _start_lock:  # after a start under way (it holds the lock)
            with _lock:
                self._background = None
            if self._started_here and ray.is_initialized():
                ray.shutdown()
            self._started_here = False
            self.owns_nodes = False
            self._stopped.set()  # the background starter, if any, may end now
            self._stopped = threading.Event()

    def __repr__(self) -> str:
        return f"LocalCluster(num_cpus={self.num_cpus}, num_gpus={self.num_gpus})"


def default_local_cluster() -> LocalCluster:
    """The process-wide embedded cluster that ``cluster=None`` means."""
    global _default
    with _lock:
        if _default is None:
            _default = LocalCluster()
        return _default
