"""The worker side of a run: each rank's pooled worker process calls the run's payload with a WorkerContext.

The processes belong to :mod:`gpu_proxy.runs.pool` and outlive a run; :func:`run_rank` is one
run's part in one of them.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import ray

from gpu_proxy import events, shipping
from gpu_proxy.dataplane.base import INLINE_LIMIT, result_name
from gpu_proxy.dataplane.package import MappedInPlace, Package, StoredFile, read_file, read_file_in_place, write_file
from gpu_proxy.runs.emitter import EventEmitter
from gpu_proxy.runs.output_capture import OutputCapture
from gpu_proxy.secrets import installed


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker sits in the run."""

    rank: int
    local_rank: int
    node_rank: int
    world_size: int
    local_world_size: int
    num_nodes: int
    use_gpu: bool
    run_name: str
    master_addr: str  # the address of rank 0's node, as Ray knows it


class WorkerContext:
    """What a payload learns about its worker, and how it talks to home."""

    def __init__(self, placement: WorkerPlacement, emitter: EventEmitter,
                 master_addr: str, master_port: int) -> None:
        self.placement = placement
        self.master_addr = master_addr
        self.master_port = master_port
        self._emitter = emitter

    rank = property(lambda self: self.placement.rank)
    local_rank = property(lambda self: self.placement.local_rank)
    node_rank = property(lambda self: self.placement.node_rank)
    local_world_size = property(lambda self: self.placement.local_world_size)
    world_size = property(lambda self: self.placement.world_size)
    num_nodes = property(lambda self: self.placement.num_nodes)
    use_gpu = property(lambda self: self.placement.use_gpu)

    def emit(self, kind: str, data: dict[str, Any] | None = None) -> None:
        """Send an event home. Never blocks on the network."""
        self._emitter.emit(kind, data)

    def should_stop(self) -> bool:
        """True once home asked the run to stop (Ctrl-C); check it at step boundaries."""
        return self._emitter.stop_requested


@dataclass(frozen=True)
class RunFiles:
    """Where a worker finds the run's payload and leaves a large result (see gpu_proxy.dataplane).

    The folder is on the supervisor's node: a worker there maps the payload file in place and
    writes its result file beside it. A worker on another node gets the payload from the object
    store (``payload_ref``) and returns its result through it; the supervisor writes the file.

    ``lone_reader``: this worker is the payload file's only reader and the folder is in memory, so
    it maps the payload for writing (package invariant 3's exception): the weights it trains are
    the file's own pages. ``results_span_payload``: the plane's fetch reads the result where it is
    written or hashes it as it streams it, so it is not hashed here and refers to what it left in the
    payload (package invariants 4 and 5).
    """

    node_id: str
    folder: str | None
    payload: StoredFile | None
    payload_ref: Any = None
    lone_reader: bool = False
    results_span_payload: bool = False

    def here(self) -> bool:
        return self.folder is not None and ray.get_runtime_context().get_node_id() == self.node_id

    def load_payload(self) -> tuple[Package, MappedInPlace | None]:
        """The payload, and where it is mapped if this worker writes into it in place."""
        if self.payload is not None and self.here():
            if self.lone_reader:
                return read_file_in_place(self.payload.location, self.payload)
            return read_file(self.payload.location, self.payload, checked=True), None  # checked on arrival
        return ray.get(self.payload_ref), None

    def result_fields(self, rank: int, package: Package, mapped: MappedInPlace | None = None) -> dict[str, Any]:
        """How a rank's result goes back: inline when small, else as a file here or through Ray."""
        if package.nbytes <= INLINE_LIMIT:
            return {"value": package.to_bytes()}
        if self.here():
            spans = self.results_span_payload
            stored = write_file(package, f"{self.folder}/{result_name(rank)}", hashed=not spans,
                                spans_of=mapped if spans else None)
            return {"stored": stored.to_dict()}
        return {"package": package}


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def _distributed_env(ctx: WorkerContext, devices: dict[str, str]) -> Iterator[None]:
    """The environment variables torch.distributed and frameworks read, set for this call only."""
    p = ctx.placement
    values = {**devices,
        "MASTER_ADDR": ctx.master_addr, "MASTER_PORT": str(ctx.master_port), "RANK": str(p.rank),
        "LOCAL_RANK": str(p.local_rank), "NODE_RANK": str(p.node_rank), "GROUP_RANK": str(p.node_rank),
        "WORLD_SIZE": str(p.world_size), "LOCAL_WORLD_SIZE": str(p.local_world_size),
        "GPU_PROXY_RUN": p.run_name,
    }
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _node_devices(placement: WorkerPlacement, channel: Any) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` as Lightning's own DDP has it: every GPU of the run on this node.

    Ray gives each worker its own GPU only, so every rank would be ``cuda:0``. Sharing the node's
    ids in local-rank order makes a worker's own GPU ``cuda:<local_rank>``, as under a local launch.
    """
    if not placement.use_gpu:
        return {}
    own = [str(gpu) for gpu in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    ids = ray.get(channel.share_devices.remote(placement.run_name, placement.node_rank, placement.local_rank,
                                               own, placement.local_world_size), timeout=120)
    return {"CUDA_VISIBLE_DEVICES": ",".join(ids)}


def _rendezvous(placement: WorkerPlacement, channel: Any) -> tuple[str, int]:
    if placement.rank == 0:
        # One node: the run's own sockets (torch's store, a framework's coordinator) stay on loopback.
        address = "127.0.0.1" if placement.num_nodes == 1 else placement.master_addr
        port = _free_port(address)
        ray.get(channel.publish_rendezvous.remote(placement.run_name, address, port))
        return address, port
    return tuple(ray.get(channel.rendezvous.remote(placement.run_name)))  # type: ignore[return-value]


def run_rank(files: RunFiles, placement: WorkerPlacement, channel: Any,
               secrets: dict[str, str] | None = None) -> dict[str, Any]:
    """Call the payload as ``placement.rank``; return ``{"rank", "value"}`` or ``{"rank", "error"}``."""
    emitter = EventEmitter(channel, placement.run_name, placement.rank)
    outcome: dict[str, Any] = {"rank": placement.rank}
    try:
        devices = _node_devices(placement, channel)
        master_addr, master_port = _rendezvous(placement, channel)
        ctx = WorkerContext(placement, emitter, master_addr, master_port)

        def forward_line(stream: str, line: str) -> None:
            emitter.emit(events.LOG, {"stream": stream, "line": line, "node": placement.node_rank})

        with OutputCapture(forward_line), _distributed_env(ctx, devices), installed(secrets or {}):
            try:
                payload, mapped = files.load_payload()
                function = payload.loads()
                del payload
                value = function(ctx)
                del function  # the payload's mapping goes with it, but for what the result still holds
                outcome.update(files.result_fields(placement.rank, shipping.pack(value, "the worker's result"),
                                                   mapped))
            except BaseException as exc:  # noqa: BLE001 - every failure goes home, KeyboardInterrupt too
                outcome["error"] = shipping.pack_exception(exc)
    finally:
        emitter.close()
    return outcome
