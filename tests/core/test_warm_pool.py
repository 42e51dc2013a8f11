"""Warm workers (gpu_proxy.runs.pool): reused when clean, replaced when not, nothing of one run in the next."""
from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from gpu_proxy import shipping
from gpu_proxy.clusters.local import default_local_cluster
from gpu_proxy.errors import RunStoppedError
from gpu_proxy.runs import RunSpec, execute, values
from gpu_proxy.runs.pool import current_pool
from gpu_proxy.runs.process_state import ProcessState

ROOT = Path(__file__).resolve().parents[2]


def run(fn, num_workers=1, kind="warm-test", on_event=None, **spec_args):
    spec = RunSpec(shipping.pack(fn, "the test's function"), num_workers=num_workers, worker_pool=kind, **spec_args)
    return execute(default_local_cluster(), spec, on_event or (lambda event: None))


def pid(ctx):
    return os.getpid()


def fail(ctx):
    raise ValueError("this run fails")


def pid_alive(process_id: int) -> bool:
    try:
        os.kill(process_id, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_clean_run_leaves_its_workers_warm_for_the_next(local_cluster):
    first = values(run(pid, num_workers=2))
    assert values(run(pid, num_workers=2)) == first  # the same processes, same ranks
    (group,) = [g for g in current_pool().describe() if g["kind"] == "warm-test" and g["workers"] == 2]
    assert group["state"] == "idle" and group["runs"] >= 2


def test_a_rank_that_ends_first_with_a_large_result_neither_ends_its_peers_nor_spoils_reuse(local_cluster):
    """Rank 0's result is over the inline limit (a file on the data plane) and comes while rank 1 still
    works: the run succeeds whole, and its workers are reused by the next run."""
    import numpy as np

    def large_first(ctx):
        if ctx.rank == 0:
            return os.getpid(), np.arange(1 << 17, dtype=np.float64)  # 1 MiB
        time.sleep(2.0)
        return os.getpid(), None

    (first_pid, weights), (peer_pid, nothing) = values(run(large_first, num_workers=2, kind="large-first"))
    assert np.array_equal(weights, np.arange(1 << 17, dtype=np.float64)) and nothing is None
    assert values(run(pid, num_workers=2, kind="large-first")) == [first_pid, peer_pid]


def test_a_failed_run_leaves_the_next_run_on_fresh_workers(local_cluster):
    (before,) = values(run(pid))
    with pytest.raises(ValueError, match="this run fails"):
        values(run(fail))
    (after,) = values(run(pid))
    assert after != before
    assert not pid_alive(before)


def test_a_stopped_run_leaves_the_next_run_on_fresh_workers(local_cluster):
    def until_stopped(ctx):
        while not ctx.should_stop():
            time.sleep(0.05)
        return os.getpid()

    def stop_soon(event):  # as Ctrl-C or a spent budget does: a graceful stop of the run
        if event.kind == "run_started":
            (control,) = default_local_cluster().active_runs()
            threading.Timer(0.5, control.request_stop, args=("the test stops it",)).start()

    with pytest.raises(RunStoppedError) as stopped:
        run(until_stopped, on_event=stop_soon)
    (stopped_pid,) = values(stopped.value.outcomes)
    (after,) = values(run(pid))
    assert after != stopped_pid


def test_idle_workers_end_after_keep_warm(local_cluster):
    (worker,) = values(run(pid, kind="short-warm", keep_warm_s=1.0))
    deadline = time.monotonic() + 20
    while pid_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(worker)
    assert not [g for g in current_pool().describe() if g["kind"] == "short-warm"]
    (none_warm,) = values(run(pid, kind="no-warm", keep_warm_s=0))
    assert not [g for g in current_pool().describe() if g["kind"] == "no-warm"]
    deadline = time.monotonic() + 20
    while pid_alive(none_warm) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(none_warm)


def test_a_run_takes_the_resources_of_idle_workers_of_another_kind(local_cluster):
    everything = int(ray.cluster_resources()["CPU"])
    (a_worker, *_) = values(run(pid, num_workers=everything, kind="kind-a"))  # holds every CPU while idle
    started = time.monotonic()
    values(run(pid, num_workers=everything, kind="kind-b", placement_timeout_s=30))
    assert time.monotonic() - started < 15  # placed once kind-a gave way, not after the timeout
    assert not pid_alive(a_worker)


def test_nothing_of_one_run_reaches_the_next_on_the_same_worker(local_cluster):
    def leave_traces(ctx):
        import random

        import torch

        import gpu_proxy_lightning.worker_reset  # noqa: F401  (what a Lightning payload imports)

        os.environ["LEFT_BY_RUN_1"] = "1"
        sys.path.append("/left/by/run/1")
        random.seed(0)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float64)
        os.chdir("/")
        return os.getpid()

    def look(ctx):
        import torch

        return {"pid": os.getpid(), "env": os.environ.get("LEFT_BY_RUN_1"), "path": "/left/by/run/1" in sys.path,
                "torch_seed": torch.initial_seed(), "dtype": str(torch.get_default_dtype()), "cwd": os.getcwd()}

    (first,) = values(run(leave_traces, kind="traces"))
    (seen,) = values(run(look, kind="traces"))
    assert seen["pid"] == first  # the same process served both runs
    assert seen["env"] is None and not seen["path"] and seen["cwd"] != "/"
    assert seen["torch_seed"] != 0 and seen["dtype"] == "torch.float32"


def test_a_run_that_left_a_file_open_leaves_the_next_run_on_fresh_workers(local_cluster, tmp_path):
    path = str(tmp_path / "a-file")
    open(path, "w").close()

    def opens_and_closes(ctx):
        with open(path) as file:
            file.read()
        return os.getpid()

    def leaves_open(ctx):
        os.open(path, os.O_RDONLY)  # never closed
        return os.getpid()

    (clean,) = values(run(opens_and_closes, kind="files"))
    assert values(run(opens_and_closes, kind="files")) == [clean]  # a run that closed its files: kept warm
    assert values(run(leaves_open, kind="files")) == [clean]
    (after,) = values(run(pid, kind="files"))
    assert after != clean and not pid_alive(clean)


def test_gpu_proxys_own_spool_is_not_a_file_a_run_left_open(tmp_path):
    """Its lock lives as long as the process (a worker uploading checkpoints): counted, every such run
    would find its workers cold."""
    from gpu_proxy.runs.process_state import _open_files
    from gpu_proxy.storage.spool import Spool

    spool = Spool(str(tmp_path))
    fd, _ = spool.new_file()
    try:
        assert [path for path in _open_files().values() if path.startswith(str(tmp_path))] == []
        kept = open(tmp_path / "user-file", "w")  # what is counted
        assert str(tmp_path / "user-file") in _open_files().values()
        kept.close()
    finally:
        os.close(fd)
        spool.close()


def test_two_runs_at_once_get_their_own_workers(local_cluster):
    def remember(ctx):
        global REMEMBERED
        REMEMBERED = ctx.placement.run_name
        time.sleep(1.0)
        return os.getpid(), REMEMBERED, os.environ["GPU_PROXY_RUN"]

    results: dict[str, tuple] = {}

    def one(name):
        (results[name],) = values(run(remember, kind="concurrent", name=name))

    threads = [threading.Thread(target=one, args=(name,)) for name in ("run-one", "run-two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["run-one"][0] != results["run-two"][0]
    assert results["run-one"][1:] == ("run-one", "run-one")
    assert results["run-two"][1:] == ("run-two", "run-two")


def test_a_module_edited_between_two_runs_runs_edited(local_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the user's project: its modules ship by value
    monkeypatch.syspath_prepend(str(tmp_path))
    module_file = tmp_path / "edited_project_module.py"
    module_file.write_text("def answer(ctx):\n    return 'before'\n")
    module = importlib.import_module("edited_project_module")
    try:
        assert values(run(lambda ctx: module.answer(ctx), kind="edited")) == ["before"]
        module_file.write_text("def answer(ctx):\n    return 'after the edit'\n")
        importlib.reload(module)
        assert values(run(lambda ctx: module.answer(ctx), kind="edited")) == ["after the edit"]
    finally:
        sys.modules.pop("edited_project_module", None)


def test_a_restore_forgets_project_modules_imported_by_name_and_keeps_installed_ones(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "by_name_module.py").write_text("VALUE = 1\n")
    state = ProcessState.snapshot()
    importlib.import_module("by_name_module")
    import json.tool  # noqa: F401  (the standard library: stays)

    state.restore()
    assert "by_name_module" not in sys.modules
    assert "json.tool" in sys.modules


@pytest.mark.parametrize("value", ["10m", -1, float("nan"), float("inf"), True])
def test_a_bad_keep_warm_is_refused_at_construction_naming_it(value):
    from gpu_proxy.errors import ConfigurationError
    from gpu_proxy_lightning import RemoteStrategy

    with pytest.raises(ConfigurationError, match=r"RemoteStrategy\(keep_warm="):
        RemoteStrategy(keep_warm=value)


@pytest.mark.parametrize("how", ["in the background", "from a thread that ends"])
def test_the_embedded_cluster_outlives_the_thread_that_started_it(tmp_path, how):
    """Ray ties GCS and raylet to the thread that started them (PR_SET_PDEATHSIG): an Optuna trial's
    thread, a notebook's, or the background start."""
    import subprocess

    script = tmp_path / "early.py"
    script.write_text(
        "import os, time\n"
        "import ray\n"
        "from gpu_proxy import shipping\n"
        "from gpu_proxy.clusters.local import LocalCluster\n"
        "from gpu_proxy.runs import RunSpec, execute, values\n"
        "import threading\n"
        "cluster = LocalCluster(num_cpus=1)\n"
        + ("cluster.start_in_background()\n" if how == "in the background" else
           "starter = threading.Thread(target=cluster.start)\nstarter.start()\nstarter.join()\n") +
        "while not ray.is_initialized():\n"
        "    time.sleep(0.1)\n"
        "time.sleep(3)  # the starter thread would have ended by now\n"
        "spec = RunSpec(shipping.pack(lambda ctx: 'ran', 'f'), num_workers=1)\n"
        "print('RESULT', values(execute(cluster, spec, lambda event: None))[0])\n"
        "cluster.stop()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert "RESULT ran" in done.stdout, done.stderr[-3000:]


def test_a_fresh_scripts_first_fit_finds_its_workers_started_at_trainer_time(tmp_path):
    """Issue 14: Trainer(...) starts the embedded cluster and its workers, importing torch and Lightning,
    in the background while the script goes on; its fit takes them instead of starting its own."""
    import subprocess

    script = tmp_path / "fresh.py"
    script.write_text(
        "import time\n"
        "import lightning as L\n"
        "import ray\n"
        "from gpu_proxy_lightning import RemoteStrategy\n"
        "from gpu_proxy.runs.pool import current_pool\n"
        "from tests.lightning_project import big_models\n"
        "trainer = big_models.trainer(RemoteStrategy(num_workers=1), callbacks=[])\n"
        "print('TRAINER_WAITED_FOR_RAY', ray.is_initialized())\n"
        "groups, deadline = [], time.monotonic() + 150\n"
        "while time.monotonic() < deadline and not (groups and groups[0]['state'] == 'idle'):\n"
        "    time.sleep(0.2)\n"
        "    groups = current_pool().describe() if ray.is_initialized() else []\n"
        "print('BEFORE', groups)\n"
        "trainer.fit(big_models.BigModel(0.01), train_dataloaders=big_models.loader())\n"
        "print('AFTER', current_pool().describe())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path, env=env)
    lines = {line.split(" ", 1)[0]: eval(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
             if line.startswith(("BEFORE", "AFTER", "TRAINER_WAITED_FOR_RAY"))}
    assert "AFTER" in lines, done.stderr[-3000:]
    (before,), (after,) = lines["BEFORE"], lines["AFTER"]
    assert (before["kind"], before["state"], before["runs"]) == ("lightning", "idle", 0)  # ready before fit
    assert (after["kind"], after["runs"]) == ("lightning", 1)  # the fit ran on it: no second group
    # Trainer(...) returned while Ray was still starting (it once waited on the start's lock: 4-8 s).
    assert lines["TRAINER_WAITED_FOR_RAY"] is False
