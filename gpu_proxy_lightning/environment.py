"""The cluster environment a worker's Trainer sees: ranks and rendezvous from the run, not from env vars."""
from __future__ import annotations

from lightning.fabric.plugins.environments import ClusterEnvironment

from gpu_proxy.runs import WorkerContext


class RemoteWorkerEnvironment(ClusterEnvironment):
    def __init__(self, ctx: WorkerContext) -> None:
        self._ctx = ctx
        self._global_rank = ctx.rank
        self._world_size = ctx.world_size

    @property
    def creates_processes_externally(self) -> bool:
        return True  # Ray started the processes

    @property
    def main_address(self) -> str:
        return self._ctx.master_addr

    @property
    def main_port(self) -> int:
        return self._ctx.master_port

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return self._world_size

    def set_world_size(self, size: int) -> None:
        self._world_size = size

    def global_rank(self) -> int:
        return self._global_rank

    def set_global_rank(self, rank: int) -> None:
        self._global_rank = rank

    def local_rank(self) -> int:
        return self._ctx.local_rank

    def node_rank(self) -> int:
        return self._ctx.node_rank
