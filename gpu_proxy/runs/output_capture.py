"""Capture a worker's stdout and stderr at the file-descriptor level, one whole line at a time.

Working on fds 1 and 2 (not ``sys.stdout``) catches everything the process prints: Python
``print``, ``logging`` handlers created before the run, and C extensions. Each line is passed to
``on_line`` and still written to the original fd, so Ray's own log files keep it. A line that
redraws itself with carriage returns (progress bars) is reduced to its last state.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Callable

_STREAMS = {1: "stdout", 2: "stderr"}


def last_state(line: str) -> str:
    """``"10%\\r50%\\r100%"`` -> ``"100%"``: what a terminal would show at the end."""
    parts = [p for p in line.split("\r") if p.strip()]
    return parts[-1] if parts else ""


class OutputCapture:
    def __init__(self, on_line: Callable[[str, str], None]) -> None:
        self._on_line = on_line
        self._saved: dict[int, int] = {}
        self._readers: list[threading.Thread] = []

    def __enter__(self) -> "OutputCapture":
        self._line_buffering = {}
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            # Line by line while captured, as on a terminal. (No flusher thread: a thread holding a
            # stream's lock when user code forks, e.g. DataLoader workers, would deadlock the child.)
            if hasattr(stream, "reconfigure"):
                self._line_buffering[stream] = stream.line_buffering
                stream.reconfigure(line_buffering=True)
        for fd in _STREAMS:
            self._saved[fd] = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            reader = threading.Thread(target=self._pump, args=(read_end, fd), daemon=True,
                                      name=f"gpu-proxy-capture-{_STREAMS[fd]}")
            reader.start()
            self._readers.append(reader)
        return self

    def _pump(self, read_end: int, fd: int) -> None:
        original = self._saved[fd]
        pending = b""
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            os.write(original, chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._deliver(raw, fd)
        if pending:
            self._deliver(pending, fd)
        os.close(read_end)

    def _deliver(self, raw: bytes, fd: int) -> None:
        text = last_state(raw.decode("utf-8", errors="replace"))
        if text:
            self._on_line(_STREAMS[fd], text)

    def __exit__(self, *exc_info: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
                if stream in self._line_buffering:
                    stream.reconfigure(line_buffering=self._line_buffering[stream])
            except ValueError:  # a user closed it
                pass
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes the pipe's last write end: the reader sees EOF
        for reader in self._readers:
            reader.join(timeout=5)
        for saved in self._saved.values():
            os.close(saved)
        self._saved.clear()
        self._readers.clear()
