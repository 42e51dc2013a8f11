"""The home side of the event stream for a Lightning run."""
from __future__ import annotations

import sys
from typing import Any

from gpu_proxy import events
from gpu_proxy.events import Event


class HomeEventHandler:
    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer

    def handle(self, event: Event) -> None:
        if event.kind == events.LOG:
            stream = sys.stderr if event.data.get("stream") == "stderr" else sys.stdout
            stream.write(f"(rank {event.rank}) {event.data['line']}\n")
            stream.flush()

    def close(self) -> None:
        pass
