"""Run a worker's job in a fresh Python process started by the Ray worker.

Why: a TensorFlow process can join one ``MultiWorkerMirroredStrategy`` cluster only, and only
before TensorFlow initialised its runtime ("Collective ops must be configured at program
startup"); and a Keras backend cannot change once ``keras`` is imported. Ray reuses its worker
processes across runs, so such a job runs in a child process of its own. The child inherits the
Ray worker's stdout/stderr (so its lines reach home like any other), sends events and its result
back on a pipe, and reads home's stop request from its stdin. When the parent dies its stdin
closes, and the child exits: no orphan keeps a port or a GPU.

A child that dies before reporting a result (SIGKILL, the OOM killer, a segfault, ``os._exit``)
is reported as :class:`~gpu_proxy.errors.WorkerLostError`, because without the child this is what
Ray reports when the worker's own process dies that way: a lost worker, which home puts before the
other ranks' errors (``gpu_proxy/runs/home.py``) and ``max_failures`` restarts from the last
committed epoch (``gpu_proxy/runs/restarts.py``). The
Ray worker reports the loss rather than killing itself to mirror it, so that it still delivers the
child's last output lines and events home and the message can name the signal.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import cloudpickle

from gpu_proxy import shipping
from gpu_proxy.errors import WorkerLostError
from gpu_proxy.secrets import install

STOP_POLL_S = 0.2


class ChildContext:
    """The WorkerContext a job sees inside the fresh process: same fields, events over a pipe."""

    def __init__(self, fields: dict[str, Any], pipe: Any) -> None:
        self.__dict__.update(fields)
        self._pipe = pipe
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def emit(self, kind: str, data: dict[str, Any] | None = None) -> None:
        self.send(("event", kind, data or {}))

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def send(self, message: tuple) -> None:
        with self._lock:
            pickle.dump(message, self._pipe, protocol=pickle.HIGHEST_PROTOCOL)
            self._pipe.flush()


_CONTEXT_FIELDS = ("rank", "local_rank", "node_rank", "world_size", "num_nodes", "use_gpu",
                   "master_addr", "master_port")


def run_in_fresh_process(job: Any, ctx: Any, env: dict[str, str]) -> Any:
    """Call ``job.run_here(child_ctx)`` in a new Python process; return its result or raise its error."""
    fields = {name: getattr(ctx, name) for name in _CONTEXT_FIELDS}
    secrets: dict[str, str] = {}
    with tempfile.NamedTemporaryFile(prefix="gpu-proxy-keras-", suffix=".pkl", delete=False) as file:
        file.write(shipping.dumps((job, fields), what="the Keras job", secrets=secrets))
    job_path = file.name
    # The run's credentials go beside the pickle, in a file only this user reads; the child deletes it.
    with tempfile.NamedTemporaryFile("w", prefix="gpu-proxy-keras-", suffix=".json", delete=False) as file:
        json.dump(secrets, file)
    secrets_path = file.name
    read_end, write_end = os.pipe()
    child_env = dict(os.environ, **env, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "gpu_proxy_keras.fresh_process", job_path, str(write_end), secrets_path],
            stdin=subprocess.PIPE, env=child_env, pass_fds=(write_end,))
        os.close(write_end)
        watcher = threading.Thread(target=_forward_stop, args=(ctx, child), daemon=True)
        watcher.start()
        outcome = _read_messages(read_end, ctx)
        child.stdin.close()
        code = child.wait()
    finally:
        for path in (job_path, secrets_path):
            if os.path.exists(path):
                os.unlink(path)
    if outcome is None:
        # Home prefixes the rank (home.py).
        raise WorkerLostError(f"the worker's training process {_death(code)} before reporting a result "
                              "(see its output above)")
    kind, value = outcome
    if kind == "error":
        raise shipping.unpack_exception(value, f"rank {ctx.rank}, training process")
    return value


def _death(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (sent by someone, or the out-of-memory killer)" if -code == signal.SIGKILL else ""
    return f"was killed by {name}{hint}"


def _read_messages(read_end: int, ctx: Any) -> tuple[str, Any] | None:
    outcome = None
    with os.fdopen(read_end, "rb") as pipe:
        while True:
            try:
                message = pickle.load(pipe)
            except EOFError:
                return outcome
            if message[0] == "event":
                ctx.emit(message[1], message[2])
            else:
                outcome = (message[0], message[1])


def _forward_stop(ctx: Any, child: subprocess.Popen) -> None:
    while child.poll() is None:
        if ctx.should_stop():
            try:
                child.stdin.write(b"stop\n")
                child.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass
            return
        time.sleep(STOP_POLL_S)


def _watch_stdin(ctx: ChildContext) -> None:
    for line in sys.stdin.buffer:
        if line.strip() == b"stop":
            ctx._stop.set()
    os._exit(3)  # stdin closed: the parent is gone (or done with us); never outlive it


def _main(job_file: str, fd: int, secrets_file: str) -> None:
    with open(secrets_file) as file:
        secrets = json.load(file)
    os.unlink(secrets_file)
    install(secrets)  # for this whole process: the job unpickles its nested parts later
    with open(job_file, "rb") as file:
        data = file.read()
    # Read once: deleted now, since a parent killed mid-run (force-cancelled) never runs its cleanup.
    os.unlink(job_file)
    job, fields = cloudpickle.loads(data)
    pipe = os.fdopen(fd, "wb")
    ctx = ChildContext(fields, pipe)
    threading.Thread(target=_watch_stdin, args=(ctx,), daemon=True).start()
    try:
        message: tuple = ("result", job.run_here(ctx))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        message = ("error", shipping.pack_exception(exc))
    ctx.send(message)
    pipe.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # TensorFlow's collective runtime can block interpreter shutdown; the result is already sent.
    os._exit(0)


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
