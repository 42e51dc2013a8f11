"""Several GPUs on a node: each worker sees the node's GPUs of the run and its own at its local rank,
and a run asking for GPUs that idle pooled workers of another kind hold gets them.

No GPU here: Ray hands out GPU ids of a cluster started with ``num_gpus`` whether or not CUDA
exists, so the environment each worker gets is real; what CUDA then does with it needs a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, time
    from gpu_proxy import shipping
    from gpu_proxy.clusters.local import LocalCluster
    from gpu_proxy.runs import RunSpec, execute, values

    def where(ctx):
        import ray
        return {"rank": ctx.rank, "local_rank": ctx.local_rank, "visible": os.environ["CUDA_VISIBLE_DEVICES"],
                "ray_gave": ray.get_runtime_context().get_accelerator_ids()["GPU"]}

    def pid(ctx):
        return os.getpid()

    def alive(process_id):
        try:
            os.kill(process_id, 0)
            return True
        except ProcessLookupError:
            return False

    cluster = LocalCluster(num_cpus=3, num_gpus=3)
    gpus = {"CPU": 1, "GPU": 1}
    # Idle workers of another kind hold every GPU: the GPU run takes them, at once.
    idle = values(execute(cluster, RunSpec(shipping.pack(pid), num_workers=3, resources_per_worker=gpus,
                                           worker_pool="other-kind"), lambda event: None))
    spec = RunSpec(shipping.pack(where), num_workers=3, resources_per_worker=gpus, placement_timeout_s=30)
    started = time.monotonic()
    print("RESULT", json.dumps(values(execute(cluster, spec, lambda event: None))))
    seconds = time.monotonic() - started
    deadline = time.monotonic() + 10  # Ray kills actors asynchronously
    while any(alive(p) for p in idle) and time.monotonic() < deadline:
        time.sleep(0.1)
    print("EVICTED", json.dumps({"seconds": seconds, "alive": [alive(p) for p in idle]}))
''')


@pytest.mark.timeout(300)
def test_each_worker_sees_the_nodes_gpus_with_its_own_at_its_local_rank(tmp_path):
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "gpus.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=280, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    ranks = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[7:])
    visible = {r["visible"] for r in ranks}
    assert len(visible) == 1, ranks  # one view of the node for every worker, as with a local launch
    ids = visible.pop().split(",")
    assert sorted(ids) == ["0", "1", "2"]
    for rank in ranks:  # cuda:<local_rank> is the GPU Ray gave this worker
        assert [rank["visible"].split(",")[rank["local_rank"]]] == [str(g) for g in rank["ray_gave"]]
    evicted = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("EVICTED"))[8:])
    assert evicted["alive"] == [False] * 3  # the idle GPU workers gave way
    assert evicted["seconds"] < 20, evicted  # placed once they did, not after the 30 s timeout
