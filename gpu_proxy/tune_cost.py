"""Cost and budget of a Ray Tune sweep on a metered cluster, on the cluster's side.

A Tune sweep runs on the cluster (a Ray Job), and its trials' runs are the trainables', so home's
cost meter (``gpu_proxy/clouds/runpod/meter.py``) cannot see them. It publishes its reading instead,
each tick, under one cluster-level key (``gpu_proxy.runs.cluster_kv.METER``): ``spent_usd``,
``usd_per_hour``, ``budget_usd``, ``budget_reached``. Here, in the sweep's processes:

- :class:`MeterFollower` (one per process) polls that key, prices the process's own clock at the
  cluster's rate, and once ``budget_reached`` asks every gpu-proxy run this process executes to stop
  at its next step (the run's ordinary stop request, the one Ctrl-C and home's meter use);
- :class:`TrialCost` is one trial's share: the cluster's rate x the trial's time x the trial's share
  of the cluster's priced resource (its GPUs of the cluster's GPUs; CPUs on a cluster without GPUs).
  A share of resources, not an even split among running trials: a trial sees its own resources,
  not the other trials, and its cost then does not depend on how many others happen to run. What the
  cluster costs beyond the trials (idle resources, the time between trials) is the sweep's only;
- :class:`BudgetStopper` ends the experiment once the budget is reached, after the running trials
  stopped, so no further trial starts.

No reading (an unmetered cluster, or no home holding it) is no cost: nothing is reported, nothing stops.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from typing_extensions import override

from gpu_proxy.runs.cluster_kv import METER, read_value

COST_KEY = "cost_usd"  # a trial's share of the cluster's spend, in each tune.report
CLUSTER_SPENT_KEY = "cluster_spent_usd"  # the cluster's spend (the sweep's, with what ran before it)
BUDGET_KEY = "budget_reached"  # True in a trial's last report, when the budget stopped its run
POLL_S = 0.5


def parse_reading(raw: bytes | None) -> dict[str, Any] | None:
    """The meter's reading from the key's bytes; ``None`` for none (absent, empty, or not a reading)."""
    if not raw:
        return None
    try:
        reading = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(reading, dict) or not isinstance(reading.get("usd_per_hour"), (int, float)):
        return None
    return reading


def read_meter() -> bytes | None:
    return read_value(*METER)


def trial_share(trial_bundles: Sequence[Mapping[str, float]], cluster: Mapping[str, float]) -> float:
    """The trial's share of the cluster's price: of its GPUs when it has some (what a GPU cloud bills),
    else of its CPUs; 0 for a trial that holds none of them."""
    priced = "GPU" if cluster.get("GPU", 0) > 0 else "CPU"
    total = float(cluster.get(priced, 0.0))
    held = sum(float(bundle.get(priced, 0.0)) for bundle in trial_bundles)
    return min(held / total, 1.0) if total > 0 else 0.0


class MeterFollower:
    """The meter's reading as this process sees it, and the budget's stop of this process's runs.

    ``spent_at_full_share()``: the cluster's rate integrated over this process's clock, USD (only
    while a reading is there); a trial's cost is its share of the increase over its time.
    """

    def __init__(self, read: Callable[[], bytes | None] = read_meter, poll_s: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self.poll_s = poll_s
        self._clock = clock
        self._lock = threading.Lock()
        self._reading: dict[str, Any] | None = None
        self._changed_at = clock()  # when this process last saw the reading change
        self._priced = 0.0  # USD at a full share, up to _last
        self._last = clock()
        self._asked: list[Any] = []  # the runs asked to stop for the budget (RunControl s)
        self._thread: threading.Thread | None = None

    def start(self) -> "MeterFollower":
        if self._thread is None:
            self.poll()
            self._thread = threading.Thread(target=self._run, name="gpu-proxy-meter-follower", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            self.poll()

    def poll(self) -> None:
        """Read the key once; on ``budget_reached``, ask this process's runs to stop."""
        try:
            reading = parse_reading(self._read())
        except Exception:  # noqa: BLE001 - Ray's store unreachable for a moment: the last reading holds
            return
        with self._lock:
            now = self._clock()
            self._priced = self._spent_locked(now)
            self._last = now
            if reading != self._reading:
                self._reading, self._changed_at = reading, now
        if reading and reading.get("budget_reached"):
            self._stop_runs(reading)

    def _spent_locked(self, now: float) -> float:
        rate = float(self._reading["usd_per_hour"]) if self._reading else 0.0
        return self._priced + rate * (now - self._last) / 3600

    def spent_at_full_share(self) -> float:
        with self._lock:
            return self._spent_locked(self._clock())

    @property
    def reading(self) -> dict[str, Any] | None:
        with self._lock:
            return self._reading

    def cluster_spent_usd(self) -> float | None:
        """The cluster's spend now: the last reading's, plus its rate since this process saw it."""
        with self._lock:
            if self._reading is None:
                return None
            elapsed = self._clock() - self._changed_at
            return float(self._reading.get("spent_usd", 0.0)) + float(self._reading["usd_per_hour"]) * elapsed / 3600

    @property
    def budget_reached(self) -> bool:
        reading = self.reading
        return bool(reading and reading.get("budget_reached"))

    def _stop_runs(self, reading: dict[str, Any]) -> None:
        from gpu_proxy.clusters.base import all_active_runs

        budget = reading.get("budget_usd")
        reason = (f"the cluster's budget_usd={budget:g} is reached (${float(reading.get('spent_usd', 0)):.2f} "
                  "spent, home's cost meter)" if isinstance(budget, (int, float)) else "the cluster's budget is reached")
        for control in all_active_runs():  # a run started after the budget too, at its first step
            if not any(control is asked for asked in self._asked):
                self._asked.append(control)
                control.request_stop(reason)

    def stopped_for_budget(self, control: Any) -> bool:
        return any(control is asked for asked in self._asked)


_FOLLOWER: MeterFollower | None = None
_FOLLOWER_LOCK = threading.Lock()


def meter_follower() -> MeterFollower | None:
    """This process's follower (started on first use); ``None`` where Ray is not connected."""
    global _FOLLOWER
    import ray

    if not ray.is_initialized():
        return None
    with _FOLLOWER_LOCK:
        if _FOLLOWER is None:
            _FOLLOWER = MeterFollower().start()
        return _FOLLOWER


class TrialCost:
    """One trial's share of the cluster's spend, from when it was made (in the trainable, as the trial
    starts). ``fields()``: what to add to a ``tune.report``; nothing before a reading was seen."""

    def __init__(self, follower: MeterFollower | None = None, share: float | None = None) -> None:
        self.follower = follower if follower is not None else meter_follower()
        self.share = share if share is not None else (current_trial_share() if self.follower else 0.0)
        self._start = self.follower.spent_at_full_share() if self.follower else 0.0
        self._metered = False

    def cost_usd(self) -> float | None:
        if self.follower is None:
            return None
        self._metered = self._metered or self.follower.reading is not None
        if not self._metered:
            return None
        return self.share * (self.follower.spent_at_full_share() - self._start)

    def fields(self) -> dict[str, float]:
        cost = self.cost_usd()
        if cost is None:
            return {}
        fields = {COST_KEY: round(cost, 6)}
        cluster = self.follower.cluster_spent_usd()
        if cluster is not None:
            fields[CLUSTER_SPENT_KEY] = round(cluster, 6)
        return fields

    @property
    def budget_reached(self) -> bool:
        return self.follower is not None and self.follower.budget_reached


def current_trial_share() -> float:
    """This trial's share of the cluster (:func:`trial_share`) from Tune's context and Ray's totals;
    0 outside a Tune trial."""
    import ray

    try:
        from ray import tune

        bundles = tune.get_context().get_trial_resources().bundles
    except Exception:  # noqa: BLE001 - not inside a Tune trial
        return 0.0
    return trial_share(bundles, ray.cluster_resources())


def _tune_stopper_base() -> tuple[type, ...]:
    from ray.tune import Callback, Stopper

    return Stopper, Callback


class BudgetStopper(*_tune_stopper_base()):  # type: ignore[misc]
    """Ends a Tune experiment once the cluster's budget is reached: no further trial starts.

    Give it to Tune both as the stopper and as a callback, ``RunConfig(stop=budget,
    callbacks=[budget])``: as a callback it sees which trials run when the budget is reached, and the
    experiment ends once those have stopped at their next step (each reports ``budget_reached`` with a
    checkpoint) rather than Tune ending them mid-step; a trial Tune started meanwhile, in a slot one of
    them freed, ends with them (its run, if it got that far, stops at its first step). Given only as
    ``stop=``, it waits ``wait_s`` after the budget is reached instead, and it never waits longer than
    that. Without a meter publishing (an unmetered cluster) it never stops.
    """

    def __init__(self, wait_s: float = 60.0, read: Callable[[], bytes | None] = read_meter,
                 poll_s: float = POLL_S) -> None:
        self.wait_s = wait_s
        self.poll_s = poll_s
        self._read = read
        self._running: set[str] | None = None  # trial ids RUNNING, when it is a callback too
        self._stopping: set[str] | None = None  # those RUNNING when the budget was reached
        self._reached_at: float | None = None
        self._polled_at = float("-inf")

    def __getstate__(self) -> dict[str, Any]:  # Tune saves its stopper with the experiment
        return {**self.__dict__, "_reached_at": None, "_stopping": None, "_polled_at": float("-inf")}

    @override
    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return bool(result.get(BUDGET_KEY))

    @override
    def stop_all(self) -> bool:
        now = time.monotonic()
        if self._reached_at is None and now - self._polled_at >= self.poll_s:
            self._polled_at = now
            try:
                reading = parse_reading(self._read())
            except Exception:  # noqa: BLE001 - the store unreachable for a moment: ask again later
                reading = None
            if reading and reading.get("budget_reached"):
                self._reached_at = now
                self._stopping = None if self._running is None else set(self._running)
        if self._reached_at is None:
            return False
        if now - self._reached_at >= self.wait_s:
            return True
        return self._stopping is not None and not self._stopping & (self._running or set())

    @override
    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._running = {trial.trial_id for trial in trials if trial.status == "RUNNING"}
