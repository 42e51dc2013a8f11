"""What a run is: the payload every worker calls, and what each worker needs."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunSpec:
    """A run, ready to execute on any cluster.

    ``payload`` is a pickled callable ``fn(ctx: WorkerContext) -> Any`` (see
    :func:`gpu_proxy.shipping.dumps`); every worker calls it once.
    """

    payload: bytes
    num_workers: int
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    name: str = field(default_factory=lambda: f"run-{uuid.uuid4().hex[:8]}")
    env: dict[str, str] = field(default_factory=dict)
    #: Runs of different pools never share a worker process: Ray reuses task processes, and a process
    #: that imported TensorFlow crashes (SIGSEGV in LLVM) when it later runs torch. One pool per framework.
    worker_pool: str = "default"
    placement_timeout_s: float = 120.0
    #: On a Ray Job: stop the run when home's heartbeat has been silent this long (None: never, detached).
    home_grace_s: float | None = 300.0
    #: Where the job driver writes the result when it is too large to stream (fsspec URL), if any.
    result_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Values the payload refers to but does not contain (see :mod:`gpu_proxy.secrets`); never pickled.
    secrets: dict[str, str] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["secrets"] = {}  # a RunSpec is pickled as a Ray Job's run.pkl, which the cluster keeps
        return state

    @property
    def use_gpu(self) -> bool:
        return self.resources_per_worker.get("GPU", 0) > 0
