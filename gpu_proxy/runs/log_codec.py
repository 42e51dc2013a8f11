"""Events as lines of a Ray Job's log: how the job driver sends the stream home.

A job's log is durable and replayable (Ray keeps it after the job ends), which is what a
re-attach needs. Each event is one marked JSON line; bytes are base64; an event longer than
``MAX_LINE`` (a result with weights) is split into numbered parts so no log line is huge.
"""
from __future__ import annotations

import base64
import json
from typing import Any, Iterator

from gpu_proxy.events import Event

MARKER = "@@gpu-proxy@@ "
PART_MARKER = "@@gpu-proxy-part@@ "
MAX_LINE = 512 * 1024


def encode_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {k: encode_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    return value


def decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes__"}:
            return base64.b64decode(value["__bytes__"])
        return {k: decode_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def encode(event: Event) -> list[str]:
    text = json.dumps(encode_value(event.to_dict()), separators=(",", ":"))
    if len(text) <= MAX_LINE:
        return [MARKER + text]
    parts = [text[i:i + MAX_LINE] for i in range(0, len(text), MAX_LINE)]
    return [f"{PART_MARKER}{i} {len(parts)} {part}" for i, part in enumerate(parts)]


class Decoder:
    """Turns log lines back into events; ignores lines that are not ours."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, line: str) -> Iterator[Event]:
        line = line.rstrip("\n")
        if line.startswith(MARKER):
            yield Event.from_dict(decode_value(json.loads(line[len(MARKER):])))
        elif line.startswith(PART_MARKER):
            index, total, part = line[len(PART_MARKER):].split(" ", 2)
            if int(index) == 0:
                self._parts = []
            self._parts.append(part)
            if int(index) == int(total) - 1 and len(self._parts) == int(total):
                text, self._parts = "".join(self._parts), []
                yield Event.from_dict(decode_value(json.loads(text)))
