"""The Ray actor that carries events from workers to the supervisor, and small run-wide signals.

It numbers events as they arrive (one sequence for the whole run) and hands them out with a
long poll. It also holds the DDP rendezvous address that rank 0 publishes and the stop request
that home sends, so the run needs no other coordination service.
"""
from __future__ import annotations

import asyncio
from typing import Any

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class EventChannel:
    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []
        self._next_seq = 0
        self._arrived = asyncio.Event()
        self._rendezvous: asyncio.Future | None = None
        self._stop_requested = False

    async def put(self, events: list[dict[str, Any]]) -> int:
        for event in events:
            event["seq"] = self._next_seq
            self._next_seq += 1
            self._events.append(event)
        self._arrived.set()
        return self._next_seq

    async def take(self, timeout_s: float) -> list[dict[str, Any]]:
        """Every event not yet taken; waits up to ``timeout_s`` for the first one."""
        if not self._events:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout_s)
            except asyncio.TimeoutError:
                return []
        events, self._events = self._events, []
        return events

    def _future(self) -> asyncio.Future:
        if self._rendezvous is None:
            self._rendezvous = asyncio.get_running_loop().create_future()
        return self._rendezvous

    async def publish_rendezvous(self, address: str, port: int) -> None:
        self._future().set_result((address, port))

    async def rendezvous(self) -> tuple[str, int]:
        return await self._future()

    async def request_stop(self) -> None:
        self._stop_requested = True

    async def stop_requested(self) -> bool:
        return self._stop_requested
