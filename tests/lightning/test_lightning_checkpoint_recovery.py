"""A checkpoint writer SIGKILLed mid-upload leaves nothing for good: its spool files are reclaimed when
a worker starts again, and the save_top_k removal it had queued is carried out on resume, once the
checkpoint meant to replace the old one is known to have committed (and never before)."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


from gpu_proxy.storage import STAGING_DIR, latest_committed, list_committed
from gpu_proxy.storage.removals import REMOVALS_DIR
from gpu_proxy.storage.spool import Spool, sweep
from gpu_proxy_lightning.checkpoint_io import AsyncFsspecCheckpointIO
from tests.support.toy_fs import SlowLocalFileSystem  # noqa: F401  (registers slowfile://)

ROOT = Path(__file__).resolve().parents[2]

# What ModelCheckpoint(save_top_k=1) does each epoch: save the new best, then remove the old one.
CHILD = textwrap.dedent("""
    import sys, time, torch
    import tests.support.toy_fs  # registers slowfile://
    from gpu_proxy_lightning.checkpoint_io import AsyncFsspecCheckpointIO

    dir_url, spool_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]

    def on_commit(url, meta):
        print("committed", url.rsplit("/", 1)[1], flush=True)
        if mode == "after-commit" and url.endswith("epoch=1.ckpt"):
            time.sleep(600)  # killed here: the new best committed, the old one's removal not yet run

    io = AsyncFsspecCheckpointIO(spool_dir=spool_dir, on_commit=on_commit)
    io.save_checkpoint({"epoch": 0, "w": torch.arange(10.0)}, f"{dir_url}/epoch=0.ckpt")
    io.wait()
    io.save_checkpoint({"epoch": 1, "w": torch.ones(40 * 2**20 // 4)}, f"{dir_url}/epoch=1.ckpt")
    io.remove_checkpoint(f"{dir_url}/epoch=0.ckpt")
    print("queued", flush=True)
    io.wait()
    print("finished", flush=True)
""")


def run_and_kill(dir_url: str, spool_dir: Path, mode: str, after_line: str, until=lambda: True) -> None:
    """Run the child, and SIGKILL it once it printed `after_line` and `until()` holds."""
    spool_dir.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SLOWFILE_MBPS="20" if mode == "mid-upload" else "2000")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, dir_url, str(spool_dir), mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == after_line:
                break
        else:
            raise AssertionError(f"child exited (rc={proc.wait()}) before printing {after_line!r}")
        deadline = time.monotonic() + 60
        while not until():
            assert proc.poll() is None, "the child finished before it could be killed"
            assert time.monotonic() < deadline, "the child never got there"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def spooled_files(spool_dir: Path) -> list[Path]:
    return list(spool_dir.rglob("*.ckpt"))


def restarted_worker_io(spool_dir: Path) -> AsyncFsspecCheckpointIO:
    """The checkpoint IO as a restarted worker gets it: unpickled from the run's payload."""
    return pickle.loads(pickle.dumps(AsyncFsspecCheckpointIO(spool_dir=str(spool_dir))))


def test_a_removal_queued_before_the_kill_happens_on_resume_once_its_replacement_committed(tmp_path):
    dir_url, spool_dir = f"slowfile://{tmp_path}/ckpts", tmp_path / "spool"
    run_and_kill(dir_url, spool_dir, "after-commit", "committed epoch=1.ckpt")
    assert list_committed(dir_url) == [f"{dir_url}/epoch=0.ckpt", f"{dir_url}/epoch=1.ckpt"]  # the kill's damage
    assert spooled_files(spool_dir)  # the new best's spool file, a checkpoint's size

    io = restarted_worker_io(spool_dir)
    assert spooled_files(spool_dir) == []  # reclaimed as the worker started
    resume_from = latest_committed(dir_url)
    assert resume_from == f"{dir_url}/epoch=1.ckpt"
    assert io.load_checkpoint(resume_from)["epoch"] == 1
    assert list_committed(dir_url) == [f"{dir_url}/epoch=1.ckpt"]
    assert not (tmp_path / "ckpts" / "epoch=0.ckpt").exists()
    assert list((tmp_path / "ckpts" / REMOVALS_DIR).iterdir()) == []
    io.teardown()


def test_a_removal_whose_replacement_never_committed_is_dropped_and_the_old_checkpoint_stays(tmp_path):
    dir_url, spool_dir = f"slowfile://{tmp_path}/ckpts", tmp_path / "spool"
    staging = tmp_path / "ckpts" / STAGING_DIR

    def partial_file_growing() -> bool:
        return any(p.stat().st_size > 0 for p in staging.glob("*.partial"))

    run_and_kill(dir_url, spool_dir, "mid-upload", "queued", partial_file_growing)
    assert spooled_files(spool_dir)

    io = restarted_worker_io(spool_dir)
    assert spooled_files(spool_dir) == []
    resume_from = latest_committed(dir_url)
    assert resume_from == f"{dir_url}/epoch=0.ckpt"  # the last good checkpoint
    assert io.load_checkpoint(resume_from)["epoch"] == 0
    assert list_committed(dir_url) == [f"{dir_url}/epoch=0.ckpt"]
    assert list((tmp_path / "ckpts" / REMOVALS_DIR).iterdir()) == []  # the intent is spent
    io.teardown()


def test_a_live_processes_spool_is_never_swept(tmp_path):
    live = Spool(str(tmp_path))
    fd, path = live.new_file()
    os.close(fd)
    other = Spool(str(tmp_path))
    os.close(other.new_file()[0])  # opening a spool sweeps abandoned ones
    assert sweep(str(tmp_path)) == [] and Path(path).exists()
    live.close()
    assert not Path(path).exists()
    other.close()
