"""The supervisor of a run: place workers, start them, relay their events, collect their outcomes.

This one function runs in the user's process (embedded cluster), in a cluster's run server
(:mod:`gpu_proxy.runs.server`) or as a detached run's Ray Job driver (docs/decisions.md, "One
supervisor, three places"). It talks to Ray only; it never unpickles the payload, so it needs no
framework installed beside it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group_table

from gpu_proxy import events
from gpu_proxy.dataplane.base import ClusterTransport, result_name
from gpu_proxy.dataplane.package import StoredFile, read_file, write_file
from gpu_proxy.events import Event
from gpu_proxy.runs.channel import forget_shared_channel, shared_channel
from gpu_proxy.runs.resources import check_fits
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.runs.pool import WorkerPool, current_pool
from gpu_proxy.runs.worker import RunFiles, WorkerPlacement

log = logging.getLogger(__name__)
POLL_S = 0.05


@dataclass
class StopRequestCount:
    """How many times the run was asked to stop, counted where the requests arrive (home's
    :class:`~gpu_proxy.runs.control.StopRequest`, SIGTERM, the abort key, a silent heartbeat) and
    read by :func:`supervise`: the first request stops every rank at its next step, the second aborts."""

    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self) -> None:
        with self._lock:
            self.requests += 1


def _placements(spec: RunSpec, pg: Any, bundles: list[int]) -> list[WorkerPlacement]:
    """Ranks in node order, so that the workers of one node have consecutive ranks (worker i in ``bundles[i]``)."""
    nodes_of = placement_group_table(pg)["bundles_to_node_id"]
    bundle_nodes = [nodes_of[bundle] for bundle in bundles]
    node_order: list[str] = []
    for index in range(spec.num_workers):
        if bundle_nodes[index] not in node_order:
            node_order.append(bundle_nodes[index])
    by_node = {node: [i for i in range(spec.num_workers) if bundle_nodes[i] == node] for node in node_order}
    node_address = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    placements, rank = [None] * spec.num_workers, 0
    for node_rank, node in enumerate(node_order):
        for local_rank, bundle in enumerate(by_node[node]):
            placements[bundle] = WorkerPlacement(
                rank=rank, local_rank=local_rank, node_rank=node_rank, world_size=spec.num_workers,
                local_world_size=len(by_node[node]), num_nodes=len(node_order), use_gpu=spec.use_gpu,
                run_name=spec.name, master_addr=node_address[node_order[0]])
            rank += 1
    return placements  # type: ignore[return-value]


def supervise(spec: RunSpec, sink: Callable[[Event], None], stop: StopRequestCount | None = None,
              pool: WorkerPool | None = None) -> list[dict[str, Any]]:
    """Run ``spec`` on the connected Ray cluster; return each rank's outcome, in rank order.

    The workers come from ``pool`` (this process's, by default): warm ones of the run's kind when
    there are, and they go back to it after a clean run (:mod:`gpu_proxy.runs.pool`).
    """
    stop = stop or StopRequestCount()
    pool = pool or current_pool()
    check_fits(spec.num_workers, spec.resources_per_worker)
    group = pool.acquire(spec)
    channel = None
    reusable = False
    transport = spec.transport
    try:
        placements = _placements(spec, group.pg, group.bundles)
        files = _run_files(spec, group.pg)
        channel = _open_channel(spec.name)
        secrets_ref = ray.put(spec.secrets)  # in the object store for the run only; never in a file
        ray.get(channel.put.remote(spec.name, [Event(events.RUN_STARTED, {  # first: warm workers are quick
            "run_name": spec.name, "num_workers": spec.num_workers,
            "num_nodes": placements[0].num_nodes, "warm_runs": group.runs}).to_dict()]))
        refs = [actor.run.remote(files, placement, channel, secrets_ref)
                for actor, placement in zip(group.actors, placements)]
        rank_of = {ref: placements[i].rank for i, ref in enumerate(refs)}
        outcomes = _follow(spec.name, refs, rank_of, channel, sink, stop, group.kill)
        reusable = stop.requests == 0 and all(map(_succeeded, outcomes))
        return [_delivered(outcome, files, transport) for outcome in outcomes]
    finally:
        if channel is not None:
            channel.close.remote(spec.name)
        pool.release(group, reusable, spec.keep_warm_s)
        if transport is not None:
            transport.close()


def _run_files(spec: RunSpec, pg: Any) -> RunFiles:
    """The payload as a checked file in the run's folder here, and in the object store if a worker needs it.

    Without a transport (a RunSpec that carries its payload in memory, as on a serverless worker)
    every worker takes the payload from the object store and large results come back through it.
    """
    here = ray.get_runtime_context().get_node_id()
    if spec.transport is None:
        return RunFiles(node_id=here, folder=None, payload=None, payload_ref=ray.put(spec.payload))
    folder = spec.transport.open()
    payload = spec.transport.receive(spec.payload_file)
    nodes = set(placement_group_table(pg)["bundles_to_node_id"].values())
    payload_ref = None
    if nodes - {here}:  # workers on other nodes cannot read this node's disk
        payload_ref = ray.put(read_file(payload.location, payload, checked=True))
    # A run's only worker may write into its payload file: no other process reads it, and a restart
    # sends the payload anew. On a disk, those writes would be written back: copy-on-write there.
    lone_reader = spec.num_workers == 1 and spec.transport.in_memory()
    return RunFiles(node_id=here, folder=folder, payload=payload, payload_ref=payload_ref,
                    lone_reader=lone_reader, results_span_payload=spec.transport.results_span_payload)


def _delivered(outcome: dict[str, Any], files: RunFiles, transport: ClusterTransport | None) -> dict[str, Any]:
    """A rank's outcome in the form home receives: large results as files home can fetch."""
    outcome = dict(outcome)
    package = outcome.pop("package", None)
    if package is not None:  # a worker on another node sent it through the object store
        if transport is None:
            outcome["value"] = package.to_bytes()
            return outcome
        stored = write_file(package, f"{files.folder}/{result_name(outcome['rank'])}",
                            hashed=not transport.results_span_payload)
        outcome["stored"] = stored.to_dict()
    if "stored" in outcome and transport is not None:
        outcome.update(transport.deliver(StoredFile.from_dict(outcome.pop("stored"))))
    return outcome


def _open_channel(run: str) -> Any:
    channel = shared_channel()
    try:
        ray.get(channel.open.remote(run), timeout=60)
    except ray.exceptions.RayError:  # killed, lost with its node, or of a cluster since shut down: a new one
        forget_shared_channel()
        channel = shared_channel()
        ray.get(channel.open.remote(run), timeout=60)
    return channel


def _relay(run: str, channel: Any, sink: Callable[[Event], None], wait_s: float) -> None:
    for raw in ray.get(channel.take.remote(run, wait_s)):
        sink(Event.from_dict(raw))


def _follow(run: str, refs: list[Any], rank_of: dict[Any, int], channel: Any,
            sink: Callable[[Event], None], stop: StopRequestCount, kill: Callable[[], None]) -> list[dict[str, Any]]:
    outcomes: dict[int, dict[str, Any]] = {}
    pending = list(refs)
    stop_sent = 0
    failed = False
    while pending:
        _relay(run, channel, sink, POLL_S)
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        for ref in done:
            rank = rank_of[ref]
            try:
                outcomes[rank] = ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError, ray.exceptions.TaskCancelledError,
                    ray.exceptions.RayError) as exc:
                outcomes[rank] = {"rank": rank, "lost": _one_line(exc)}
            failed |= not _succeeded(outcomes[rank])
        if stop.requests > stop_sent:
            stop_sent = stop.requests
            if stop_sent == 1:
                ray.get(channel.request_stop.remote(run))
        if pending and (failed or stop_sent > 1):
            # One rank failed: the others would wait forever in a collective. End them now.
            kill()
            deadline = time.monotonic() + 10
            while pending and time.monotonic() < deadline:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
                for ref in done:
                    rank = rank_of[ref]
                    try:  # it may have ended on its own first: keep its own outcome (a lost child, say),
                        # marked so home ranks the error that came first before it (home.py)
                        outcomes[rank] = dict(ray.get(ref), ended_during_cancel=True)
                    except ray.exceptions.RayError:
                        outcomes[rank] = {"rank": rank, "cancelled": True, "lost": "stopped because another "
                                          "rank failed" if failed else "aborted by a second interrupt"}
            for ref in pending:
                outcomes[rank_of[ref]] = {"rank": rank_of[ref], "cancelled": True, "lost": "did not stop in time"}
            pending = []
    _relay(run, channel, sink, 0)
    return [outcomes[rank] for rank in sorted(outcomes)]


def _succeeded(outcome: dict[str, Any]) -> bool:
    """A rank's outcome holds its result, inline or (when large) as a file or a package: a rank that ends
    first with a large result must not end its peers, nor keep its workers from being reused."""
    return "error" not in outcome and "lost" not in outcome


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """Ray's errors span many lines (an actor's id, pid, namespace...): home lists each loss on one."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
