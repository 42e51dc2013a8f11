"""``gpu-proxy up local``: a Ray cluster on this machine that outlives the script, kept by name.

The embedded cluster lives and dies with one Python process, so every script pays Ray's start
(4-8 s here) and its workers' imports. A kept one is a ``ray start --head --block`` in a session of
its own, every port on loopback, token auth on (the token file beside the saved definition); any
script reaches it by its saved name, and its run server's warm workers serve script after script.
``gpu-proxy down NAME`` ends the session.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from gpu_proxy.clusters import saved
from gpu_proxy.clusters.ray_node import (RayNodeSpec, RayPorts, default_ray_executable, generate_token, kill_session,
                                         start_node, wait_for_nodes)


def start_kept_local(name: str, num_cpus: int | None = None, num_gpus: int | None = None,
                     ray_executable: str | None = None) -> dict[str, Any]:
    """Start the node, wait until it answers, and return the definition to save under ``name``."""
    token_file = saved.save_token(name, generate_token())
    folder = Path(tempfile.mkdtemp(prefix="gpk-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    spec = RayNodeSpec(role="head", node_ip="127.0.0.1", token_file=token_file, ports=RayPorts.free_on_this_machine(),
                       num_cpus=num_cpus, num_gpus=num_gpus, temp_dir=str(folder / "ray"),
                       ray_executable=ray_executable or default_ray_executable())
    node = start_node(spec, log_path=str(folder / "ray-start.log"))
    url = f"http://127.0.0.1:{spec.dashboard_port}"
    try:
        wait_for_nodes(url, Path(token_file).read_text().strip(), 1,
                       failure=lambda: None if node.alive() else f"`ray start` exited:\n{node.log_tail()}")
    except BaseException:
        kill_session(node.pid)
        raise
    return {"kind": "local", "address": url, "token_file": token_file, "session": node.pid, "folder": str(folder)}


def stop_kept_local(definition: dict[str, Any]) -> None:
    kill_session(int(definition["session"]))
    Path(definition["token_file"]).unlink(missing_ok=True)
