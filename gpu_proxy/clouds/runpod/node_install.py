"""Bootstrap a pod started from a stock image, over SSH: make it run what home runs, then start the
node (:mod:`gpu_proxy.clouds.runpod.node`, the code the node image's entrypoint runs).

Per node: probe the versions there (a stdlib script); install with pip what differs from home
(gpu-proxy itself as a wheel built from home's own code, or the release home runs; Ray, cloudpickle
and home's framework pinned to home's versions; the user's ``requirements=``/``pip=``); record what
was installed in the node's Python prefix, so a pod that already has it skips the install (warm);
check the versions again; start the node detached. Each step is a progress line ("node 1/2:
installing ray 2.60.0 ..."); a failed install raises :class:`BootstrapError` with pip's own error.

Where the pod's own environment is: RunPod's stock images write the container's ``RUNPOD_*``
variables and ``PATH`` to ``/etc/rp_environment`` (an ssh session does not inherit the container's
environment); every command here sources it first. ``GPU_PROXY_RP_ENVIRONMENT`` names another file
(the tests' stand-in pods, which share one machine).
"""
from __future__ import annotations

import base64
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from gpu_proxy.clouds.runpod.provision import LaunchError
from gpu_proxy.clouds.runpod.versions import (PROBE_SCRIPT, check_same_versions, home_versions, mismatches,
                                              project_root, public_version, source_digest)
from gpu_proxy.clusters.ray_bootstrap import detached_script
from gpu_proxy.ssh import SSHError, SSHTarget, run_remote

# Source the pod's environment, then find its Python.
PRELUDE = ('rp="${GPU_PROXY_RP_ENVIRONMENT:-/etc/rp_environment}"; if [ -r "$rp" ]; then . "$rp"; fi; '
           'py="$(command -v python3 || command -v python)"; '
           '[ -n "$py" ] || { echo "no python3 on the pod" >&2; exit 3; }; ')
REMOTE_DIR = "/tmp/gpu-proxy-bootstrap"
MARKER = "gpu-proxy-bootstrap.json"  # in the node Python's sys.prefix: what was installed there
# The pip name of each compared package (Ray with the extras a node needs: dashboard, Jobs).
PIP_NAMES = {"ray": "ray[default]", "cloudpickle": "cloudpickle", "torch": "torch", "lightning": "lightning",
             "keras": "keras", "tensorflow": "tensorflow"}


class BootstrapError(LaunchError):
    """Installing home's versions on a pod failed (the message holds pip's error)."""


@dataclass(frozen=True)
class InstallPlan:
    """What every node gets: home's versions, gpu-proxy's own wheel (or release), the user's extras."""

    home: Mapping[str, str]
    project_wheel: Path | None  # home runs gpu-proxy from a source tree: a wheel of exactly that code
    requirements: tuple[str, ...] = ()  # the user's requirements= / pip=
    pip_options: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        """Names this install: the same key on a node means the same things are installed there."""
        digest = hashlib.sha256(json.dumps([dict(self.home), list(self.requirements)], sort_keys=True).encode())
        if self.project_wheel is not None:
            digest.update(hashlib.sha256(self.project_wheel.read_bytes()).digest())
        return digest.hexdigest()[:16]


def build_project_wheel(root: Path, cache: Path | None = None) -> Path:
    """A wheel of the gpu-proxy source at ``root`` (pure Python, no dependencies bundled), cached by content."""
    folder = (cache or Path(tempfile.gettempdir()) / "gpu-proxy-wheels") / source_digest(root)
    wheels = sorted(folder.glob("gpu_proxy-*.whl")) if folder.is_dir() else []
    if wheels:
        return wheels[0]
    building = folder.with_name(folder.name + f".tmp{time.time_ns()}")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(building), str(root)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BootstrapError(f"Could not build a wheel of gpu-proxy from {root} to install on the pods:\n"
                             f"{result.stderr.strip()[-2000:]}")
    if not folder.exists():
        building.replace(folder)
    return sorted(folder.glob("gpu_proxy-*.whl"))[0]


def install_plan(requirements: Sequence[str] = (), pip_options: Sequence[str] = ()) -> InstallPlan:
    root = project_root()
    return InstallPlan(home=home_versions(), project_wheel=build_project_wheel(root) if root else None,
                       requirements=tuple(requirements), pip_options=tuple(pip_options))


def _pins(plan: InstallPlan, node: Mapping[str, str]) -> list[str]:
    """``name==version`` for every compared package home has and the node lacks or has in another version."""
    return [f"{PIP_NAMES[name]}=={public_version(plan.home[name])}" for name in mismatches(plan.home, node)
            if name in PIP_NAMES]


class NodeBootstrap:
    """One node's bootstrap; ``label`` is e.g. ``node 1/2``."""

    def __init__(self, target: SSHTarget, plan: InstallPlan, label: str, progress: Callable[[str], None],
                 install_timeout_s: float = 1800.0) -> None:
        self.target = target
        self.plan = plan
        self.label = label
        self.progress = progress
        self.install_timeout_s = install_timeout_s
        self.installed = False  # True after this bootstrap installed something (a cold node)
        self.pid: int | None = None  # the node's process on the pod, once started
        self.log_file = ""

    def say(self, message: str) -> None:
        self.progress(f"{self.label}: {message}")

    def _run(self, script: str, *, input: str | None = None, timeout_s: float = 120.0, check: bool = True):
        return run_remote(self.target, PRELUDE + script, input=input, timeout_s=timeout_s, check=check)

    def probe(self) -> dict[str, str]:
        """The node's versions, and ``marker``: the key of the last install gpu-proxy made there."""
        script = (f'"$py" - <<\'EOF\'\n{PROBE_SCRIPT}\nEOF\n'
                  f'cat "$("$py" -c "import sys; print(sys.prefix)")/{MARKER}" 2>/dev/null || true')
        lines = self._run(script).stdout.strip().splitlines()
        found = json.loads(lines[0])
        if len(lines) > 1:
            try:
                found["marker"] = json.loads(lines[1]).get("key", "")
            except ValueError:
                pass
        return found

    def install(self) -> dict[str, str]:
        """Make the node run home's versions; returns its versions afterwards."""
        node = self.probe()
        if node.get("python") != self.plan.home["python"]:
            check_same_versions({"python": self.plan.home["python"]}, node, f"RunPod {self.label}")
        pins = _pins(self.plan, node)
        wheel = self.plan.project_wheel
        if node.get("marker") == self.plan.key and not pins:
            self.say(f"already has home's versions ({self.plan.key}): skipping the install")
            return node
        names = ", ".join(p.replace("==", " ") for p in pins + list(self.plan.requirements))
        what = f"gpu-proxy {self.plan.home.get('gpu-proxy', '')}" + (f", {names}" if names else "")
        self.say(f"installing {what} ...")
        started = time.monotonic()
        commands = [f'mkdir -p {REMOTE_DIR}']
        options = " ".join(shlex.quote(option) for option in self.plan.pip_options)
        pip = f'"$py" -m pip install --disable-pip-version-check --no-input {options}'
        if wheel is not None:
            remote_wheel = f"{REMOTE_DIR}/{wheel.name}"
            self._run(f"mkdir -p {REMOTE_DIR} && base64 -d > {shlex.quote(remote_wheel)}",
                      input=base64.b64encode(wheel.read_bytes()).decode())
            # --no-deps: its dependencies are the pins below, at home's versions, not whatever is newest.
            commands.append(f"{pip} --no-deps --force-reinstall {shlex.quote(remote_wheel)}")
        elif "gpu-proxy" in self.plan.home:
            pins.insert(0, f"gpu-proxy=={self.plan.home['gpu-proxy']}")
        if pins or self.plan.requirements:
            commands.append(f"{pip} " + " ".join(shlex.quote(r) for r in pins + list(self.plan.requirements)))
        marker = json.dumps({"key": self.plan.key})
        commands.append(f"printf '%s' {shlex.quote(marker)} > \"$(\"$py\" -c 'import sys; print(sys.prefix)')/{MARKER}\"")
        result = self._run("{ " + " && ".join(f"{{ {command}; }}" for command in commands) + "; } 2>&1",
                           timeout_s=self.install_timeout_s, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
            raise BootstrapError(f"Installing {what} on RunPod {self.label} failed (pip exit {result.returncode}):\n"
                                 f"{tail}\nFix the requirement (requirements=/pip=), or pass image= with an image "
                                 f"that has them. The pods have been terminated.")
        self.installed = True
        after = self.probe()
        self.say(f"installed in {time.monotonic() - started:.1f} s")
        return after

    def check(self, node: Mapping[str, str]) -> None:
        check_same_versions(self.plan.home, node, f"RunPod {self.label}")

    def start_node(self, env: Mapping[str, str], log_file: str) -> None:
        """Start the node detached in its own session, with ``env`` over the pod's own environment."""
        log = shlex.quote(log_file)
        script = f'mkdir -p "$(dirname {log})" || exit 1\n' + detached_script(
            '"$py" -m gpu_proxy.clouds.runpod.node', env, log_file)
        try:
            self.pid = int(self._run(script).stdout.strip().splitlines()[-1])
        except (SSHError, ValueError, IndexError) as error:
            raise LaunchError(f"Could not start the gpu-proxy node on RunPod {self.label}: {error}") from None
        self.log_file = log_file

    def failure(self) -> str | None:
        """Why the node started here is gone, with its log's tail; None while it runs (or SSH does not answer)."""
        if self.pid is None:
            return None
        log = shlex.quote(self.log_file)
        try:
            result = self._run(f"kill -0 {self.pid} 2>/dev/null && echo alive || tail -n 25 {log}", check=False)
        except SSHError:
            return None
        if result.stdout.startswith("alive"):
            return None
        return f"The gpu-proxy node on RunPod {self.label} exited:\n{result.stdout.strip()}"


def bootstrap_nodes(targets: Sequence[SSHTarget], envs: Sequence[Mapping[str, str]], plan: InstallPlan,
                    progress: Callable[[str], None], log_file: str) -> list[NodeBootstrap]:
    """Install and check every node (all before any starts: a skew fails before Ray runs), then start them."""
    nodes = [NodeBootstrap(target, plan, f"node {index + 1}/{len(targets)}", progress)
             for index, target in enumerate(targets)]
    # In parallel: each pod's pip is its own (on RunPod a cold install of Ray takes about a minute per pod).
    with ThreadPoolExecutor(max_workers=min(8, len(nodes)), thread_name_prefix="gpu-proxy-bootstrap") as pool:
        for future in [pool.submit(lambda node=node: node.check(node.install())) for node in nodes]:
            future.result()  # the first failure is raised (after every node's install ended)
    for node, env in zip(nodes, envs):
        rank = env.get("NODE_RANK")  # an Instant Cluster's node: its rank decides (rank 0 is the head)
        node.say(f"starting the Ray {env.get('ROLE') or ('head' if rank == '0' else 'worker' if rank else 'node')}")
        node.start_node(env, log_file)
    return nodes
