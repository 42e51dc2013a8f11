"""``python -m gpu_proxy.clouds.runpod.node``: run the node (see :mod:`gpu_proxy.clouds.runpod.node`)."""
import os
import sys

# Ray reads its auth mode once, when it is first imported (gpu_proxy imports it): this process's own
# GCS client (the idle watcher's) must use token auth like the node it starts. So: before any import.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN_PATH", os.environ.get("RAY_TOKEN_FILE", "").strip() or "/run/gpu-proxy/ray_token")

from gpu_proxy.clouds.runpod.node.main import main  # noqa: E402

sys.exit(main())
