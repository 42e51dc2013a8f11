"""The node image's entrypoint: start sshd with the given key, then a Ray head or worker.

The node itself is :mod:`gpu_proxy.clouds.runpod.node` (installed with gpu-proxy, so a pod started
from a stock image runs the same code once home has installed gpu-proxy there); its package
docstring lists every environment variable it reads. This file only runs it with the image's Python.

Exit status: 2 for bad configuration (with every problem listed), 1 when Ray or sshd fails,
Ray's own status when it exits, 0 after SIGTERM/SIGINT stopped the node cleanly.
"""
from __future__ import annotations

import os
import sys

# Ray reads its auth mode once, when it is first imported (gpu_proxy imports it): this process's own
# GCS client (the idle watcher's) must use token auth like the node it starts.
if __name__ == "__main__":  # as the node's process only: importing this module changes nothing
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN_PATH",
                          os.environ.get("RAY_TOKEN_FILE", "").strip() or "/run/gpu-proxy/ray_token")

from gpu_proxy.clouds.runpod.node.config import NodeConfig, read_config  # noqa: E402,F401
from gpu_proxy.clouds.runpod.node.main import main  # noqa: E402
from gpu_proxy.clouds.runpod.node.pod_self import ClusterMemberSelf, PodSelf  # noqa: E402,F401
from gpu_proxy.clouds.runpod.node.runpod_env import private_environment as _private_environment  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
