"""`gpu-proxy up local`: a kept cluster on this machine serves one fresh script after another warm."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent("""
    import os, sys
    from gpu_proxy import shipping
    from gpu_proxy.clusters.resolve import resolve_cluster
    from gpu_proxy.runs import RunSpec, execute, values

    def pid(ctx):
        return os.getpid()

    spec = RunSpec(shipping.pack(pid, "f"), num_workers=1, worker_pool="kept-test")
    print("WORKER", values(execute(resolve_cluster(sys.argv[1]), spec, lambda event: None))[0])
""")


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpu_proxy.cli", *args], env=env, capture_output=True,
                          text=True, timeout=180)


def test_up_local_serves_fresh_scripts_with_warm_workers_and_down_stops_it(tmp_path):
    env = dict(os.environ, GPU_PROXY_CONFIG_DIR=str(tmp_path / "config"))
    up = cli("up", "local", "--name", "kept", "--num-cpus", "1", env=env)
    assert up.returncode == 0, up.stderr
    workers: list[int] = []
    try:
        script = tmp_path / "train.py"
        script.write_text(SCRIPT)
        for _ in range(2):  # two fresh Python processes, as two runs of a script
            done = subprocess.run([sys.executable, str(script), "kept"], env=env, capture_output=True, text=True,
                                  timeout=180, cwd=tmp_path)
            assert done.returncode == 0, done.stderr[-3000:]
            workers.append(int(done.stdout.split("WORKER")[1]))
        assert workers[0] == workers[1]  # the second script found the first one's worker warm
    finally:
        down = cli("down", "kept", env=env)
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    assert workers and _gone(workers[0])


def _gone(pid: int) -> bool:
    """Ended: no process, or a zombie its dead parent left for init to reap."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
