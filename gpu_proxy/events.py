"""The run's event stream: what workers tell home while a run goes on.

Every event has a kind, the rank that sent it (``None`` for the supervisor), a wall-clock time and a
payload. The channel that collects events gives each one a sequence number, so a home that
reconnects asks for "everything after N" and gets no gap and no duplicate.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

RUN_STARTED = "run_started"
PROGRESS = "progress"
METRICS = "metrics"
HPARAMS = "hparams"
LOG = "log"
WARNING = "warning"
CHECKPOINT = "checkpoint"
RESTART = "restart"
COST = "cost"  # added at home by a cluster that meters money: spent_usd, usd_per_hour, budget_usd
ERROR = "error"
FINISHED = "finished"
STOPPED = "stopped"  # the run was stopped without home asking (its home went away): reason, checkpoint
RESULT = "result"  # a worker's final outcome; consumed by the home launcher, not by users


@dataclass
class Event:
    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    time: float = field(default_factory=time.time)
    seq: int = -1

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies the payload, and workers call this on every logged step.
        return {"kind": self.kind, "data": self.data, "rank": self.rank, "time": self.time, "seq": self.seq}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Event":
        return cls(kind=raw["kind"], data=raw.get("data") or {}, rank=raw.get("rank"),
                   time=raw.get("time", 0.0), seq=raw.get("seq", -1))
