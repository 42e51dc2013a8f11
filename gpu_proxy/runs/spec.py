"""What a run is: the payload every worker calls, and what each worker needs."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpu_proxy.dataplane.base import ClusterTransport
    from gpu_proxy.dataplane.package import Package, StoredFile


@dataclass
class RunSpec:
    """A run, ready to execute on any cluster.

    ``payload`` is a packed callable ``fn(ctx: WorkerContext) -> Any`` (see
    :func:`gpu_proxy.shipping.pack`); every worker calls it once. Home's data plane sends it
    before the run starts (``payload_file``, ``transport``); a RunSpec without a transport carries
    its payload in memory (``bytes`` are taken as a plain pickle).
    """

    payload: "Package | bytes | None"
    num_workers: int
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    name: str = field(default_factory=lambda: f"run-{uuid.uuid4().hex[:8]}")
    #: Runs of different pools never share a worker process (gpu_proxy.runs.pool): a process that
    #: imported TensorFlow crashes (SIGSEGV in LLVM) when it later runs torch. One pool per framework.
    worker_pool: str = "default"
    placement_timeout_s: float = 120.0
    #: How long the run's worker processes stay warm for the next run of their kind (0: they end with the run).
    keep_warm_s: float = 600.0
    #: On a Ray Job: stop the run when home's heartbeat has been silent this long (None: never, detached).
    home_grace_s: float | None = 300.0
    #: Where a cluster given by address stages bulky data (fsspec URL), and its fsspec options.
    staging_dir: str | None = None
    staging_options: dict[str, Any] | None = None
    #: About how large rank 0's result will be (the trained weights), so a plane with a limit can say
    #: so before the run starts.
    result_bytes_hint: int = 0
    #: Values the payload refers to but does not contain (see :mod:`gpu_proxy.secrets`); never pickled.
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    #: Set by home's data plane: the sent payload, and the supervisor's half of the plane.
    payload_file: "StoredFile | None" = None
    transport: "ClusterTransport | None" = None

    def __post_init__(self) -> None:
        if isinstance(self.payload, (bytes, bytearray)):
            from gpu_proxy.dataplane.package import Package

            self.payload = Package(bytes(self.payload), [])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["secrets"] = {}  # a RunSpec is pickled as a Ray Job's run.pkl, which the cluster keeps
        if self.transport is not None:
            state["payload"] = None  # it travels through the data plane, never in the pickle
        return state

    @property
    def use_gpu(self) -> bool:
        return self.resources_per_worker.get("GPU", 0) > 0
