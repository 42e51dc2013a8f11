"""A stand-in for RunPod's stock PyTorch images, for the fake RunPod API's pods.

What a ``runpod/pytorch`` pod is, and what the stand-in does in its place:

* its start script writes ``PUBLIC_KEY`` to authorized_keys and starts sshd: the stand-in starts a
  real sshd on a free loopback port with the pod's key (gpu-proxy's own sshd writer, as the
  container's init, not the node code);
* it writes the container's ``RUNPOD_*`` variables and ``PATH`` to ``/etc/rp_environment`` for ssh
  sessions: the stand-in writes them to the pod's own file and tells sshd (``SetEnv
  GPU_PROXY_RP_ENVIRONMENT``) where it is, since every stand-in pod shares this machine;
* it ships Python, pip and torch but not gpu-proxy or Ray: the stand-in is a fresh venv per pod
  (``--without-pip``, a fraction of a second) whose only addition is one ``.pth`` line making the
  test environment's site-packages importable: that is the image's preinstalled stack (torch, and
  here also Ray and pip). gpu-proxy is *not* importable there: the test environment's gpu-proxy is an
  editable install, whose import hook a plain ``.pth`` path does not run. So the bootstrap really
  installs gpu-proxy with pip (its wheel, built from home's tree) into the pod's venv, and really
  finds the versions it probes. Why this is a faithful stand-in: the bootstrap's decisions (probe,
  pins, skip when warm, pip's errors) run unchanged; what is not exercised is downloading Ray or torch
  from PyPI (no network here; a real pod has it), which is pip's job, not ours.
* ``hidden``: distributions the stack leaves out (its ``.pth`` then names a folder of links to every
  other entry of the test environment's site-packages), so that pip really installs them into the
  pod's venv, from the machine's package index, when the bootstrap pins them.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

from gpu_proxy.clouds.runpod.node.sshd import SshdConfig, start_sshd

RP_ENVIRONMENT_ENV = "GPU_PROXY_RP_ENVIRONMENT"
_STDERR_LOCK = threading.Lock()  # sshd's log goes to the pod's log through fd 2, one pod at a time


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stack(folder: Path, hidden: tuple[str, ...]) -> Path:
    """The test environment's site-packages, or a folder of links to all of it but ``hidden``'s packages
    (their import package and their ``.dist-info``)."""
    site = Path(sysconfig.get_path("purelib"))
    if not hidden:
        return site
    names = {name.lower().replace("-", "_") for name in hidden}
    stack = folder / "stack"
    stack.mkdir()
    for entry in site.iterdir():
        stem = entry.name.split("-", 1)[0].lower() if entry.name.endswith(".dist-info") else entry.name.lower()
        if stem.removesuffix(".py") not in names:
            (stack / entry.name).symlink_to(entry)
    return stack


class StockImageRuntime:
    """Pods of ``runpod/*`` images: sshd and a fresh venv, nothing of gpu-proxy."""

    def __init__(self, num_cpus: int = 1, python: str = sys.executable) -> None:
        self.num_cpus = num_cpus
        self.python = python
        self.folder = Path(tempfile.mkdtemp(prefix="gpst-", dir="/tmp"))
        self._sshd: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self.extra_env: dict[str, str] = {}  # added to each pod's environment file (a broken setting, in tests)
        self.hidden: tuple[str, ...] = ()  # distributions (pip names) the pods' stack leaves out

    def venv_of(self, pod_id: str) -> Path:
        return self.folder / pod_id / "venv"

    def start(self, pod) -> tuple[str, int]:
        from tests.fakes.runpod_api import machine_address

        folder = self.folder / pod.id
        folder.mkdir(mode=0o700)
        venv = folder / "venv"
        subprocess.run([self.python, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
        site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        (site / "_stock_image_stack.pth").write_text(str(_stack(folder, self.hidden)) + "\n")
        # The stack's console script, as pip would have put it beside the image's Python.
        ray = venv / "bin" / "ray"
        ray.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom ray.scripts.scripts import main\n"
                       "sys.exit(main())\n")
        ray.chmod(0o755)
        port = _free_port()
        environment = {"RUNPOD_POD_ID": pod.id, "RUNPOD_PUBLIC_IP": "127.0.0.1", "RUNPOD_TCP_PORT_22": str(port),
                       "RUNPOD_GPU_COUNT": str(pod.gpu_count), "RUNPOD_API_KEY": pod.scoped_key,
                       "RUNPOD_REST_URL": pod.rest_url, "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
                       # Test seams (RunPod sets none of these): one machine for all pods; Ray sees the
                       # GPUs the pod rents; no usage stats.
                       "NUM_GPUS": str(pod.gpu_count), "NUM_CPUS": str(self.num_cpus),
                       "RAY_USAGE_STATS_ENABLED": "0"}
        if pod.global_networking or pod.cluster_id is not None:
            environment["GPU_PROXY_TEST_INTERNAL_IP"] = machine_address() or "127.0.0.1"
        environment.update(self.extra_env)
        rp_file = folder / "rp_environment"
        rp_file.write_text("".join(f"export {name}='{value}'\n" for name, value in environment.items()))
        rp_file.chmod(0o600)
        keys = [line.strip() for line in pod.env.get("PUBLIC_KEY", "").splitlines() if line.strip()]
        config = SshdConfig(port=port, listen_address="127.0.0.1", folder=folder / "ssh",
                            authorized_keys=folder / "authorized_keys", public_keys=keys, strict_modes=False,
                            binary="/usr/sbin/sshd", session_env={RP_ENVIRONMENT_ENV: str(rp_file)})
        with open(folder / "pod.log", "w") as log, _STDERR_LOCK:
            sys.stderr.flush()
            stderr = os.dup(2)
            os.dup2(log.fileno(), 2)
            try:
                process = start_sshd(config)
            finally:
                sys.stderr.flush()
                os.dup2(stderr, 2)
                os.close(stderr)
        with self._lock:
            self._sshd[pod.id] = process
        return "127.0.0.1", port

    def alive(self, pod) -> bool:
        process = self._sshd.get(pod.id)
        return process is not None and process.poll() is None

    def stop(self, pod) -> None:
        with self._lock:
            process = self._sshd.pop(pod.id, None)
        if process is not None:
            _end_container(process, str(self.folder / pod.id / "rp_environment"))

    def close(self) -> None:
        with self._lock:
            items = list(self._sshd.items())
            self._sshd.clear()
        for pod_id, process in items:
            _end_container(process, str(self.folder / pod_id / "rp_environment"))
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _end_container(sshd: subprocess.Popen, rp_file: str, grace_s: float = 20.0) -> None:
    """What a container's end does: SIGTERM to its main process, then SIGKILL to every process left.
    Those started over SSH left sshd's tree (setsid): they are found by the pod's environment file,
    which every session's process inherits. The main process here is the node (it stops Ray itself)."""
    import psutil

    def members() -> list:
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(RP_ENVIRONMENT_ENV) == rp_file:
                    found.append(process)
            except (psutil.Error, OSError):
                continue
        return found

    nodes = []
    for process in members():
        try:
            if "gpu_proxy.clouds.runpod.node" in " ".join(process.cmdline()):
                process.send_signal(signal.SIGTERM)
                nodes.append(process)
        except psutil.Error:
            pass
    psutil.wait_procs(nodes, timeout=grace_s)
    for process in members():
        try:
            process.kill()
        except psutil.Error:
            pass
    sshd.terminate()
    try:
        sshd.wait(timeout=10)
    except subprocess.TimeoutExpired:
        sshd.kill()


class ImageRuntimes:
    """What a pod runs depends on its image, as on RunPod: ``runpod/*`` stock images get the stand-in,
    others (gpu-proxy's node image) the real entrypoint."""

    def __init__(self, node_image, stock: StockImageRuntime) -> None:
        self.node_image = node_image
        self.stock = stock

    def _for(self, pod):
        return self.stock if pod.image.startswith("runpod/") else self.node_image

    def start(self, pod):
        return self._for(pod).start(pod)

    def alive(self, pod) -> bool:
        return self._for(pod).alive(pod)

    def stop(self, pod) -> None:
        self._for(pod).stop(pod)

    def close(self) -> None:
        self.stock.close()
        self.node_image.close()
