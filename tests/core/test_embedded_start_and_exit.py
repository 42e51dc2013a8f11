"""A fresh script's embedded cluster: neither delayed by another Ray on this machine, nor outliving it."""
from __future__ import annotations

import ast
import socket
import subprocess
import sys
import time

import psutil

RAY_AGENT_PORT = 52365  # the port Ray's dashboard agent takes unless told otherwise

SCRIPT = """
import psutil, ray
from gpu_proxy.clusters.local import LocalCluster

LocalCluster(num_cpus=1).start()
node = ray._private.worker._global_node
port = node._ray_params.dashboard_agent_listen_port
raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
agents = [p for p in raylet.children()
          if " ".join(p.cmdline()).startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))]
listening = {c.laddr.port for a in agents for c in a.net_connections("inet") if c.status == psutil.CONN_LISTEN}
print("PORT", port, "LISTENING", port in listening)
print("AGENTS", [a.pid for a in agents])
# Without a dashboard, Ray's API server would serve usage statistics alone, and ray.init waited for it.
print("API_SERVER", [p.pid for p in psutil.Process().children() if "dashboard/dashboard.py" in " ".join(p.cmdline())])
# no stop(): the script's exit ends the cluster, as a user's script does
"""


def test_the_agent_takes_a_free_port_no_api_server_starts_and_the_agents_end_with_the_script(tmp_path):
    """Ray's dashboard agent listens on 52365 by default. Held by another Ray (a kept cluster, a test
    session's, the last script's agent in its last seconds), the agent retried for 3.3 s and the raylet
    waited for it: a fresh script's ray.init took 7 s instead of 3. And an exit without Ray's grace
    left the raylet's agents running for about a minute after the script."""
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", RAY_AGENT_PORT))
        holder.listen()
    except OSError:
        holder.close()
        holder = None  # already held by another Ray here: the case itself
    script = tmp_path / "start.py"
    script.write_text(SCRIPT)
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    finally:
        if holder is not None:
            holder.close()
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines()
             if line.startswith(("PORT", "AGENTS", "API_SERVER"))}
    assert "AGENTS" in lines, done.stderr[-3000:]
    port, listening = lines["PORT"].split(" LISTENING ")
    assert int(port) != RAY_AGENT_PORT and listening == "True"
    assert lines["API_SERVER"] == "[]"
    agents = ast.literal_eval(lines["AGENTS"])
    assert len(agents) == 2  # the dashboard agent and the runtime-env agent
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in agents):
        time.sleep(0.1)
    assert [pid for pid in agents if _alive(pid)] == []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

