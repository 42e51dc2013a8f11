"""The Ray actor that carries events from workers to the supervisor, and small run-wide signals.

One channel serves every run a supervising process starts (creating an actor costs a new worker
process, most of a warm run's fixed cost), keyed by run name. For each run it numbers events as
they arrive (one sequence for the whole run) and hands them out with a long poll. It also holds
the DDP rendezvous address that rank 0 publishes and the stop request that home sends, so a run
needs no other coordination service.
"""
from __future__ import annotations

import asyncio
from typing import Any

import ray


class _RunState:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.next_seq = 0
        self.arrived = asyncio.Event()
        self.rendezvous: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stop_requested = False
        self.devices: dict[int, dict[int, list[str]]] = {}  # node rank -> local rank -> its GPU ids
        self.devices_changed = asyncio.Event()


@ray.remote(num_cpus=0, max_restarts=0)
class EventChannel:
    def __init__(self) -> None:
        self._runs: dict[str, _RunState] = {}

    def _run(self, run: str) -> _RunState:
        if run not in self._runs:
            self._runs[run] = _RunState()
        return self._runs[run]

    async def open(self, run: str) -> None:
        self._run(run)

    async def close(self, run: str) -> None:
        self._runs.pop(run, None)

    async def put(self, run: str, events: list[dict[str, Any]]) -> None:
        state = self._runs.get(run)
        if state is None:
            return  # the run is over: a cancelled worker's last words go nowhere

        for event in events:
            event["seq"] = state.next_seq
            state.next_seq += 1
            state.events.append(event)
        state.arrived.set()

    async def take(self, run: str, timeout_s: float) -> list[dict[str, Any]]:
        """Every event of ``run`` not yet taken; waits up to ``timeout_s`` for the first one."""
        state = self._run(run)
        if not state.events:
            state.arrived.clear()
            try:
                await asyncio.wait_for(state.arrived.wait(), timeout_s)
            except asyncio.TimeoutError:
                return []
        events, state.events = state.events, []
        return events

    async def publish_rendezvous(self, run: str, address: str, port: int) -> None:
        self._run(run).rendezvous.set_result((address, port))

    async def rendezvous(self, run: str) -> tuple[str, int]:
        return await self._run(run).rendezvous

    async def share_devices(self, run: str, node_rank: int, local_rank: int, ids: list[str],
                            local_world_size: int) -> list[str]:
        """Every GPU id of the run's workers on this node, in local-rank order, once all have said theirs."""
        state = self._run(run)
        node = state.devices.setdefault(node_rank, {})
        node[local_rank] = ids
        state.devices_changed.set()
        while len(node) < local_world_size:
            state.devices_changed.clear()
            await state.devices_changed.wait()
        return [gpu for rank in sorted(node) for gpu in node[rank]]

    async def request_stop(self, run: str) -> None:
        self._run(run).stop_requested = True

    async def stop_requested(self, run: str) -> bool:
        state = self._runs.get(run)
        return state.stop_requested if state else False


_shared: tuple[tuple[str, str], Any] | None = None


def shared_channel() -> Any:
    """This process's channel on the connected Ray cluster, created on first use.

    Keyed by job *and* node: after ``ray.shutdown()`` and a new ``ray.init()`` (notebooks, test
    fixtures) the new cluster's driver has the same job id, and the old handle would point into a
    cluster that is gone.
    """
    global _shared
    context = ray.get_runtime_context()
    key = (context.get_job_id(), context.get_node_id())
    if _shared is None or _shared[0] != key:
        _shared = (key, EventChannel.remote())
    return _shared[1]


def forget_shared_channel() -> None:
    global _shared
    _shared = None
