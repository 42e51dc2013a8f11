"""Warm workers: groups of worker processes that outlive a run and serve the next run of their kind.

A run's fixed cost is its worker processes: starting them and importing torch or TensorFlow
takes seconds, the run itself often less. The supervising process (home on the embedded cluster,
the cluster's run server elsewhere: :mod:`gpu_proxy.runs.server`) keeps its workers in a pool.

Invariants, and where the code keeps them:

1. A group is ``num_workers`` :class:`PoolWorker` actors, one per bundle of one placement group,
   made for one kind of run (:class:`GroupKey`: framework pool, workers, resources per worker,
   the workers' environment). Processes of two kinds are never shared (:meth:`WorkerPool.acquire`).
2. A group serves one run at a time: a busy group is never in the idle list (``acquire``/``release``).
3. A group goes back to the idle list only after a run in which every rank returned a value and
   nobody asked to stop; otherwise its processes are killed, so a failed, killed or interrupted
   run (a broken CUDA context, a half-torn process group) never meets the next run (``release``).
4. Between runs a process puts back what the run changed: environment, working directory,
   ``sys.path``, project modules imported by name, and what frameworks register
   (:mod:`gpu_proxy.runs.process_state`). It does so after its run's result went home, as the
   actor's next call (``release``), so the reset is off the run's critical path; a group whose
   reset failed, or whose run left files open, is never handed out again (``WorkerGroup.alive``).
5. An idle group lives ``keep_warm_s`` (the last run's setting) and is then killed; ``0`` kills it
   at release (:meth:`WorkerPool._reap`).
6. A run whose resources idle groups hold takes them: idle groups are killed, least recently used
   first, until its placement group is placed (:meth:`WorkerPool._place`). Idle groups of other
   supervising processes on the cluster (another home's run server, a detached run's driver) give
   way too: a placement that still waits posts a request in the cluster's key-value store, and
   every pool with idle groups watches it (:meth:`WorkerPool._reap`).
7. A group may start before its first run (:meth:`WorkerPool.prewarm`, when the embedded cluster's
   Trainer is made): it joins the idle list once its processes imported the framework, and a run of
   its kind that comes meanwhile waits for it instead of starting a second group.
8. A run whose supervising process is itself inside a placement group (a Ray Tune trial, whose
   resources Tune reserved, workers included) makes no group of its own, which would wait for
   resources Tune already holds: its workers go in that group's last ``num_workers`` bundles
   (:meth:`WorkerPool._borrow`). Such a group never takes idle groups, is never kept warm and never
   removes the placement group it borrowed: that belongs to Tune, which frees it with the trial.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gpu_proxy.errors import ClusterResourceError, ConfigurationError
from gpu_proxy.runs.process_state import ProcessState
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.runs.worker import RunFiles, WorkerPlacement, run_rank

log = logging.getLogger(__name__)

EVICT_POLL_S = 0.2  # how long a placement waits before an idle group gives way
YIELD_POLL_S = 0.5  # how often a pool with idle groups looks for another process's request
YIELD_KEY = b"gpu-proxy/pool/yield-request"
PING_TIMEOUT_S = 10.0


def _yield_request() -> bytes | None:
    from ray.experimental import internal_kv

    if not ray.is_initialized():
        return None
    try:
        return internal_kv._internal_kv_get(YIELD_KEY)
    except Exception:  # noqa: BLE001 - a cluster going away: nobody to yield to
        return None


def _post_yield_request() -> bytes:
    from ray.experimental import internal_kv

    request = f"{os.getpid()}-{time.time()}".encode()
    internal_kv._internal_kv_put(YIELD_KEY, request, overwrite=True)
    return request


def ask_idle_workers_to_yield() -> None:
    """Have every pool on the connected cluster end its idle groups now (invariant 6's request), for
    Ray work that is not a gpu-proxy run (a Ray Tune sweep, Ray Train) and would otherwise wait for
    their resources until ``keep_warm`` ends. Nothing without a connected cluster."""
    if ray.is_initialized():
        _post_yield_request()


@ray.remote(max_restarts=0, max_task_retries=0)
class PoolWorker:
    """One worker process of a group: runs one rank of each run its group serves."""

    def __init__(self) -> None:
        self._state = ProcessState.snapshot()

    def ping(self) -> bool:
        return True

    def run(self, files: RunFiles, placement: WorkerPlacement, channel: Any,
            secrets: dict[str, str] | None = None) -> dict[str, Any]:
        return run_rank(files, placement, channel, secrets)

    def preload(self, modules: tuple[str, ...]) -> bool:
        """Import what runs of this kind import (torch, Lightning: seconds) before the first run needs it."""
        for name in modules:
            importlib.import_module(name)
        self._state = ProcessState.snapshot()  # what was imported belongs to the warm process
        return True

    def reset(self) -> str | None:
        """Put back what the last run changed (invariant 4); an actor runs its calls in order, so
        the next run starts after it. Freeing a 2 GB run's memory alone takes seconds. Returns why
        this process cannot serve another run, or None (a value, not an error: a group killed
        before anyone asks would leave an error unread, which Ray logs later)."""
        return self._state.restore()


@dataclass(frozen=True)
class GroupKey:
    """What makes two runs able to share worker processes."""

    worker_pool: str
    num_workers: int
    resources: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, spec: RunSpec) -> "GroupKey":
        return cls(spec.worker_pool, spec.num_workers,
                   tuple(sorted((k, float(v)) for k, v in spec.resources_per_worker.items() if v)))


@dataclass(eq=False)
class WorkerGroup:
    key: GroupKey
    pg: Any
    actors: list[Any]
    bundles: list[int] = field(default_factory=list)  # each worker's bundle of ``pg``
    borrowed: bool = False  # ``pg`` is the supervising process's own (a Tune trial's): never removed here
    runs: int = 0
    idle_since: float = 0.0
    keep_warm_s: float = 0.0
    resets: list[Any] = field(default_factory=list, repr=False)  # the last run's resets, pending
    _killed: bool = field(default=False, repr=False)

    def alive(self) -> bool:
        """Every process answers and put back what the last run changed."""
        try:
            answers = ray.get(self.resets + [actor.ping.remote() for actor in self.actors], timeout=PING_TIMEOUT_S)
            return not any(isinstance(answer, str) for answer in answers)  # a reset's reason not to reuse
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return False
        finally:
            self.resets = []

    def kill(self) -> None:
        """End the group's processes and give its resources back (idempotent, never raises)."""
        if self._killed:
            return
        self._killed = True
        if not ray.is_initialized():  # its cluster is gone, and with it the processes (never auto-init one)
            return
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or the cluster is
                pass
        if self.borrowed:
            return
        try:
            remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001
            pass

    def describe(self, now: float) -> dict[str, Any]:
        return {"kind": self.key.worker_pool, "workers": self.key.num_workers,
                "resources": dict(self.key.resources), "runs": self.runs,
                "state": "idle" if self.idle_since else "busy",
                "idle_s": round(now - self.idle_since, 1) if self.idle_since else 0.0,
                "keep_warm_s": self.keep_warm_s}


class WorkerPool:
    """The warm groups of one supervising process on one Ray cluster."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[WorkerGroup] = []  # least recently used first
        self._busy: list[WorkerGroup] = []
        self._warming: dict[GroupKey, threading.Event] = {}  # groups prewarm is starting
        self._wake = threading.Event()
        self._reaper: threading.Thread | None = None
        self._yield_seen = _yield_request()
        self.closed = False

    def acquire(self, spec: RunSpec) -> WorkerGroup:
        """A group for ``spec``: an idle one of its kind, else a new one (idle groups giving way)."""
        key = GroupKey.of(spec)
        enclosing = get_current_placement_group()
        if enclosing is not None:  # invariant 8: inside a Tune trial, in the trial's own bundles
            return self._borrow(spec, key, enclosing)
        warming = self._warming.get(key)
        if warming is not None:  # a group for runs like this one is starting (prewarm): take it when ready
            warming.wait(spec.placement_timeout_s)
        while True:
            with self._lock:
                group = next((g for g in reversed(self._idle) if g.key == key), None)
                if group is None:
                    break
                self._idle.remove(group)
                group.idle_since = 0.0
                self._busy.append(group)
            if group.alive():
                return group
            self._forget(group)  # a process died while idle (node lost, OOM): try the next, or make one
        return self._start_group(spec)

    def prewarm(self, spec: RunSpec, modules: tuple[str, ...] = ()) -> None:
        """Start an idle group for runs like ``spec`` before the first one comes, importing ``modules``
        in it; that run's ``acquire`` waits for it rather than starting a second. Only for a pool that
        has no group yet (a fresh process's first run: later runs find their groups warm anyway, and
        a guess would take resources from them). Never raises: the run itself then starts its
        workers, and says what went wrong."""
        key = GroupKey.of(spec)
        with self._lock:
            if self.closed or self._warming or self._idle or self._busy:
                return
            ready = self._warming[key] = threading.Event()
        group = None
        try:
            group = self._start_group(spec)
            ray.get([actor.preload.remote(modules) for actor in group.actors], timeout=spec.placement_timeout_s)
            self._park(group, True, spec.keep_warm_s, reset=False)  # no run yet: nothing to put back
        except Exception:  # noqa: BLE001
            log.debug("prewarming %s workers failed", key.worker_pool, exc_info=True)
            if group is not None:
                self._forget(group)
        finally:
            with self._lock:
                self._warming.pop(key, None)
            ready.set()

    def _start_group(self, spec: RunSpec) -> WorkerGroup:
        pg = self._place(spec)
        bundles = list(range(spec.num_workers))
        group = WorkerGroup(GroupKey.of(spec), pg, [self._start_worker(spec, pg, b) for b in bundles], bundles)
        with self._lock:
            self._busy.append(group)
        return group

    def _borrow(self, spec: RunSpec, key: GroupKey, pg: Any) -> WorkerGroup:
        holds_one = bool(ray.get_runtime_context().get_assigned_resources())  # a trainable of {"CPU": 1}, say
        bundles = borrowed_bundles(spec.num_workers, spec.resources_per_worker, pg.bundle_specs, holds_one)
        group = WorkerGroup(key, pg, [self._start_worker(spec, pg, b) for b in bundles], bundles, borrowed=True)
        with self._lock:
            self._busy.append(group)
        return group

    def release(self, group: WorkerGroup, reusable: bool, keep_warm_s: float) -> None:
        """Back to the idle list after a clean run (invariant 3), else killed."""
        group.runs += 1
        self._park(group, reusable, keep_warm_s, reset=True)

    def _park(self, group: WorkerGroup, reusable: bool, keep_warm_s: float, reset: bool) -> None:
        """From busy to idle for ``keep_warm_s`` (a run's processes first put back what it changed), or killed."""
        with self._lock:
            if group in self._busy:
                self._busy.remove(group)
            keep = reusable and keep_warm_s > 0 and not self.closed and not group.borrowed
            if keep:
                if reset:
                    group.resets = [actor.reset.remote() for actor in group.actors]
                group.idle_since, group.keep_warm_s = time.monotonic(), keep_warm_s
                self._idle.append(group)
        if not keep:
            group.kill()
            return
        self._start_reaper()
        self._wake.set()

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [g.describe(now) for g in self._busy + self._idle]

    def clear(self) -> int:
        """Kill every idle group now; return how many there were (busy ones finish their runs first)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for group in idle:
            group.kill()
        return len(idle)

    def close(self) -> None:
        """Kill every group, busy ones too (the supervising process is going away)."""
        with self._lock:
            self.closed = True
            groups, self._idle, self._busy = self._idle + self._busy, [], []
        for group in groups:
            group.kill()
        self._wake.set()

    def is_empty(self) -> bool:
        with self._lock:
            return not self._idle and not self._busy

    def _forget(self, group: WorkerGroup) -> None:
        with self._lock:
            if group in self._busy:
                self._busy.remove(group)
        group.kill()

    def _place(self, spec: RunSpec) -> Any:
        bundles = [{k: v for k, v in spec.resources_per_worker.items() if v} for _ in range(spec.num_workers)]
        pg = placement_group(bundles, strategy="PACK", name=f"gpu-proxy-{spec.worker_pool}-{spec.name}")
        deadline = time.monotonic() + spec.placement_timeout_s
        asked_others = False
        while True:
            with self._lock:
                victim = self._idle.pop(0) if self._idle else None
            if victim is None and not asked_others:
                asked_others = True
                wait_s = EVICT_POLL_S
            else:
                wait_s = EVICT_POLL_S if victim is not None else max(deadline - time.monotonic(), 0.0)
            try:
                ray.get(pg.ready(), timeout=wait_s)
                if victim is not None:  # placed without it: it stays warm
                    with self._lock:
                        self._idle.insert(0, victim)
                return pg
            except ray.exceptions.GetTimeoutError:
                if victim is not None:
                    victim.kill()  # invariant 6: it gives way, and the placement waits again
                    continue
                if wait_s == EVICT_POLL_S and time.monotonic() < deadline:
                    # Nothing of ours left to give: ask the other pools (not this one's reaper).
                    self._yield_seen = _post_yield_request()
                    continue
                remove_placement_group(pg)
                raise ClusterResourceError(
                    f"The cluster could not place {spec.num_workers} workers of {spec.resources_per_worker} "
                    f"within {spec.placement_timeout_s:g} s: the resources exist but are busy with other "
                    "work. Wait for it to finish, or lower num_workers.") from None

    @staticmethod
    def _start_worker(spec: RunSpec, pg: Any, bundle: int) -> Any:
        resources = dict(spec.resources_per_worker)
        options: dict[str, Any] = {
            "num_cpus": resources.pop("CPU", 0), "num_gpus": resources.pop("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
        }
        if resources:
            options["resources"] = resources
        return PoolWorker.options(**options).remote()

    def _start_reaper(self) -> None:
        with self._lock:
            if self._reaper is not None and self._reaper.is_alive():
                return
            # A request posted while this pool had nothing idle was for then, not for the group idle now.
            self._yield_seen = _yield_request()
            self._reaper = threading.Thread(target=self._reap, name="gpu-proxy-pool-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        while not self.closed and ray.is_initialized():
            now = time.monotonic()
            with self._lock:
                expired = [g for g in self._idle if now - g.idle_since >= g.keep_warm_s]
                self._idle = [g for g in self._idle if g not in expired]
                waits = [g.idle_since + g.keep_warm_s - now for g in self._idle]
                if not expired and not waits:
                    self._reaper = None
                    return
            for group in expired:
                group.kill()
            request = _yield_request()
            if request != self._yield_seen:  # another process's run waits for resources
                self._yield_seen = request
                self.clear()
            self._wake.wait(min(min(waits, default=0.0), YIELD_POLL_S) if not expired else 0.0)
            self._wake.clear()


def borrowed_bundles(num_workers: int, per_worker: dict[str, float], bundle_specs: list[dict[str, float]],
                     holds_first: bool) -> list[int]:
    """The last ``num_workers`` bundles of an enclosing placement group, each able to hold one worker.

    The first bundle holds the supervising process itself (a Tune trial's trainable, see
    ``gpu_proxy_lightning.tune.trial_resources``), which no worker may share when the process holds
    resources there (``holds_first``); a group too small, or bundles too small for the run's
    ``resources_per_worker``, is a :class:`ConfigurationError` before any worker starts.
    """
    wanted = {k: float(v) for k, v in per_worker.items() if v}
    bundles = list(range(len(bundle_specs) - num_workers, len(bundle_specs)))
    if bundles and bundles[0] >= int(holds_first) and all(
            all(bundle_specs[b].get(k, 0.0) >= v for k, v in wanted.items()) for b in bundles):
        return bundles
    raise ConfigurationError(
        f"This run is inside a placement group (a Ray Tune trial's?) with bundles {bundle_specs}; its "
        f"{num_workers} worker(s) of {wanted} each need one bundle of their own after the trainable's. "
        f"Give the trainable tune.with_resources(fn, gpu_proxy_lightning.tune.trial_resources("
        f"num_workers={num_workers}, ...)) matching the strategy's num_workers and resources_per_worker.")


def check_keep_warm(value: object, owner: str) -> float:
    """``keep_warm`` as seconds, or :class:`ConfigurationError` naming it and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"{owner}(keep_warm={value!r}): give seconds >= 0 that the run's worker "
                                 "processes stay warm for the next run (default 600; 0: they end with the run).")
    return float(value)


_pool: tuple[tuple[str, str], WorkerPool] | None = None
_pool_lock = threading.Lock()


def current_pool() -> WorkerPool:
    """This process's pool on the connected Ray cluster (a new one after ``ray.shutdown()`` + ``ray.init()``)."""
    global _pool
    context = ray.get_runtime_context()
    key = (context.get_job_id(), context.get_node_id())
    with _pool_lock:
        if _pool is None or _pool[0] != key:
            if _pool is not None:
                _pool[1].closed = True  # its cluster is gone; its reaper ends
            _pool = (key, WorkerPool())
        return _pool[1]
