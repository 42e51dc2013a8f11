"""The node's one way of saying things: a prefixed line on stderr (RunPod shows it in the pod's logs)."""
from __future__ import annotations

import sys

PREFIX = "gpu-proxy node:"


def say(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)
