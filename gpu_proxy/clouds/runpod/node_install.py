"""Bootstrap a pod started from a stock image, over SSH: make it run what home runs, then start the
node (:mod:`gpu_proxy.clouds.runpod.node`, the code the node image's entrypoint runs).

Per node: probe the versions there (a stdlib script); install with pip what differs from home
(gpu-proxy itself as a wheel built from home's own code, or the release home runs; Ray, cloudpickle
and home's framework pinned to home's versions, and so are gpu-proxy's own dependencies, since its
wheel goes in with ``--no-deps``; the user's ``requirements=``/``pip=``); record what
was installed in the node's Python prefix, so a pod that already has it skips the install (warm);
check the versions again; start the node detached. Each step is a progress line ("node 1/2:
installing ray 2.60.0 ..."); a failed install raises :class:`BootstrapError` with pip's own error.

Where the pod's own environment is: RunPod's stock images write the container's ``RUNPOD_*``
variables and ``PATH`` to ``/etc/rp_environment`` (an ssh session does not inherit the container's
environment); every command here sources it first. ``GPU_PROXY_RP_ENVIRONMENT`` names another file
(the tests' stand-in pods, which share one machine).

Which Python: ``python3.<home's minor>`` where the pod has it, else ``python3``. RunPod's
``runpod/pytorch:1.0.x-...-ubuntu2404`` images have ``python3`` = 3.12 (torch is installed there) and
also ship Python 3.9 to 3.13 with pip: a home on Python 3.11 gets the pod's 3.11 (and torch installed
into it), not a version-skew error after the pods were paid for. A pod with neither fails the check
with both Pythons named.
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

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gpu_proxy.clouds.runpod.provision import LaunchError
from gpu_proxy.versions import (PIP_NAMES, PROBE_SCRIPT, check_same_versions, home_versions, mismatches,
                                project_root, public_version, source_digest)
from gpu_proxy.clusters.ray_bootstrap import detached_script
from gpu_proxy.ssh import SSHError, SSHTarget, run_remote

REMOTE_DIR = "/tmp/gpu-proxy-bootstrap"
MARKER = "gpu-proxy-bootstrap.json"  # in the node Python's sys.prefix: what was installed there


def prelude(python: str) -> str:
    """Source the pod's environment, then find its Python: ``python3.<minor>`` of home's ``python``
    (``3.11``) first, else ``python3`` (whose version the probe then compares with home's)."""
    if not python.replace(".", "").isdigit():
        raise ValueError(f"not a Python major.minor: {python!r}")
    return ('rp="${GPU_PROXY_RP_ENVIRONMENT:-/etc/rp_environment}"; if [ -r "$rp" ]; then . "$rp"; fi; '
            f'py="$(command -v python{python} || command -v python3 || command -v python)"; '
            '[ -n "$py" ] || { echo "no python3 on the pod" >&2; exit 3; }; ')


class BootstrapError(LaunchError):
    """Installing home's versions on a pod failed (the message holds pip's error)."""


@dataclass(frozen=True)
class InstallPlan:
    """What every node gets: home's versions, gpu-proxy's own wheel (or release), the user's extras."""

    home: Mapping[str, str]
    project_wheel: Path | None  # home runs gpu-proxy from a source tree: a wheel of exactly that code
    requirements: tuple[str, ...] = ()  # the user's requirements= / pip=
    pip_options: tuple[str, ...] = field(default=())
    dependencies: tuple[str, ...] = ()  # gpu-proxy's own dependencies at home's versions (runtime_pins)

    @property
    def key(self) -> str:
        """Names this install: the same key on a node means the same things are installed there."""
        digest = hashlib.sha256(json.dumps([dict(self.home), list(self.requirements), list(self.dependencies)],
                                           sort_keys=True).encode())
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


def _wheel_requires(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's metadata."""
    import zipfile
    from email.parser import HeaderParser

    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return HeaderParser().parsestr(archive.read(name).decode()).get_all("Requires-Dist") or []


def runtime_pins(wheel: Path | None) -> tuple[str, ...]:
    """``name==version`` at home's installed versions for every runtime dependency of gpu-proxy (those of
    ``wheel``'s metadata, else of the installed gpu-proxy), and ``pytorch-lightning`` where home has
    ``lightning`` (which requires it unpinned): the wheel goes in with ``--no-deps``, so without these a node
    would keep, or resolve, versions outside the gates of :mod:`gpu_proxy.version_gates`."""
    from importlib import metadata

    requires = _wheel_requires(wheel) if wheel is not None else (metadata.requires("gpu-proxy") or [])
    wanted = [Requirement(text) for text in requires]
    wanted = [req for req in wanted if req.marker is None or req.marker.evaluate({"extra": ""})]
    if "lightning" in home_versions():
        wanted.append(Requirement("pytorch-lightning"))
    pins: dict[str, str] = {}
    for req in wanted:
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        pins.setdefault(canonicalize_name(req.name), f"{req.name}{extras}=={public_version(version)}")
    return tuple(pins.values())


def install_plan(requirements: Sequence[str] = (), pip_options: Sequence[str] = ()) -> InstallPlan:
    root = project_root()
    wheel = build_project_wheel(root) if root else None
    return InstallPlan(home=home_versions(), project_wheel=wheel, requirements=tuple(requirements),
                       pip_options=tuple(pip_options), dependencies=runtime_pins(wheel))


def _pins(plan: InstallPlan, node: Mapping[str, str]) -> list[str]:
    """``name==version`` for every compared package home has and the node lacks or has in another version
    (gpu-proxy itself is the wheel, or pinned by the caller)."""
    return [f"{PIP_NAMES[name]}=={public_version(plan.home[name])}" for name in mismatches(plan.home, node)
            if name in PIP_NAMES and name != "gpu-proxy"]


def _with_dependencies(pins: list[str], dependencies: Sequence[str]) -> list[str]:
    """``pins``, then each dependency pin whose package ``pins`` does not name already."""
    named = {canonicalize_name(Requirement(pin).name) for pin in pins}
    return pins + [pin for pin in dependencies if canonicalize_name(Requirement(pin).name) not in named]


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
        return run_remote(self.target, prelude(self.plan.home["python"]) + script, input=input,
                          timeout_s=timeout_s, check=check)

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
        python = self.plan.home["python"]
        if node.get("python") != python:
            check_same_versions({"python": python}, node, f"RunPod {self.label}", fix=(
                f"The pod has no python{python}, and its python3 ({node.get('python_executable') or '?'}) is "
                f"{node.get('python') or 'unknown'}: run home on Python {node.get('python') or '?'}, or pass "
                f"image= with an image of Python {python} (cluster_image/Dockerfile)."))
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
        # One resolve: home's versions of what is compared and of gpu-proxy's dependencies, the user's extras.
        wanted = _with_dependencies(pins, self.plan.dependencies) + list(self.plan.requirements)
        if wanted:
            commands.append(f"{pip} " + " ".join(shlex.quote(r) for r in wanted))
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
        check_same_versions(self.plan.home, node, f"RunPod {self.label}", fix=(
            "gpu-proxy installed home's versions there, yet the pod runs others (its image pins them?): pass "
            "image= with an image of home's versions (`python cluster_image/build_args.py`)."))

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
