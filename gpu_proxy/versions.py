"""The versions that must agree between home and a cluster's nodes, and the one check that they do.

A model pickled at home must unpickle on the nodes (cloudpickle, the framework), and Ray's wire
protocol is not compatible across versions: so Python (major.minor), gpu-proxy, Ray, and whichever
of torch/Lightning and Keras/TensorFlow home runs must be the same on the nodes. Every cluster kind
uses this module: the run server reports :func:`home_versions` of the cluster and home compares
them with :func:`mismatches` (:mod:`gpu_proxy.runs.server_client`); a RunPod pod is probed before
and after its bootstrap (:mod:`gpu_proxy.clouds.runpod.node_install`); ``gpu-proxy image check``
compares an image's. The probe is a stdlib-only script, so it runs on a node before anything of ours
is installed there. Nothing here imports a cloud's code.
"""
from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Collection, Mapping

from gpu_proxy.errors import ConfigurationError

# What is compared, by distribution name (a TensorFlow build may be named tensorflow or tensorflow-cpu).
PACKAGES: dict[str, tuple[str, ...]] = {
    "gpu-proxy": ("gpu-proxy",), "ray": ("ray",), "cloudpickle": ("cloudpickle",), "torch": ("torch",),
    "lightning": ("lightning",), "keras": ("keras",), "tensorflow": ("tensorflow", "tensorflow-cpu"),
}
# The pip requirement that installs each compared name at a version (Ray with the extras a node needs).
PIP_NAMES = {"gpu-proxy": "gpu-proxy", "ray": "ray[default]", "cloudpickle": "cloudpickle", "torch": "torch",
             "lightning": "lightning", "keras": "keras", "tensorflow": "tensorflow"}

PROBE_SCRIPT = """
import json, sys
from importlib import metadata
names = %s
found = {"python": "%%d.%%d" %% sys.version_info[:2], "python_executable": sys.executable}
for key, dists in names.items():
    for dist in dists:
        try:
            found[key] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            pass
print(json.dumps(found))
""" % json.dumps(PACKAGES)


class VersionSkewError(ConfigurationError):
    """Home and a node run different versions of something that must match."""


def public_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: the local build tag names the CUDA flavour, not the API."""
    return version.split("+", 1)[0]


def home_versions() -> dict[str, str]:
    """What this process runs, for every compared package installed here. gpu-proxy's is the imported
    code's ``__version__`` (a source tree put first on ``sys.path`` is what runs, whatever pip recorded)."""
    import gpu_proxy

    found = {"python": "%d.%d" % sys.version_info[:2]}
    for key, dists in PACKAGES.items():
        if key == "gpu-proxy":
            found[key] = gpu_proxy.__version__
            continue
        for dist in dists:
            try:
                found[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def project_root() -> Path | None:
    """The source tree home's gpu-proxy is imported from, when it is one (a checkout, an editable install)."""
    import gpu_proxy

    root = Path(gpu_proxy.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def source_digest(root: Path) -> str:
    """Names the gpu-proxy code under ``root`` (a source tree or a site-packages folder): its
    ``pyproject.toml``, if any, and every ``gpu_proxy*`` package's modules. Two trees of one version
    number with other code get other digests."""
    digest = hashlib.sha256()
    for path in sorted(p for p in [root / "pyproject.toml", *root.glob("gpu_proxy*/**/*.py")] if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# What a cluster may lack although home has it: a run of one framework does not need the other's.
FRAMEWORKS = ("torch", "lightning", "keras", "tensorflow")


def mismatches(home: Mapping[str, str], node: Mapping[str, str], missing_ok: Collection[str] = ()) -> list[str]:
    """The compared names (those home has) whose versions differ on the node (or are missing there, unless
    in ``missing_ok``); a local build tag (``+cpu``, ``+cu128``) is no difference."""
    return [name for name in ("python", *PACKAGES) if name in home and not (name in missing_ok and not node.get(name))
            and public_version(node.get(name) or "") != public_version(home[name])]


def describe(versions: Mapping[str, str]) -> str:
    return ", ".join(f"{name} {versions[name]}" for name in ("python", *PACKAGES) if name in versions)


def install_command(home: Mapping[str, str], names: list[str]) -> str:
    """``pip install 'ray[default]==2.60.0' ...``: home's versions of ``names`` (Python is not pip's)."""
    pins = [f"'{PIP_NAMES[name]}=={public_version(home[name])}'" for name in names if name in PIP_NAMES]
    return "pip install " + " ".join(pins) if pins else ""


def check_same_versions(home: Mapping[str, str], node: Mapping[str, str], where: str, fix: str = "",
                        missing_ok: Collection[str] = ()) -> None:
    """Raise :class:`VersionSkewError` naming both lists when ``where`` differs from home. ``fix``: how
    to make them agree, for this kind of cluster (default: install home's versions there)."""
    different = mismatches(home, node, missing_ok)
    if not different:
        return
    node_text = ", ".join(f"{name} {node.get(name) or 'missing'} (home {home[name]})" for name in different)
    if not fix:
        command = install_command(home, different)
        fix = ("Install the same versions on both sides" + (f", e.g. on the cluster's nodes: {command}" if command
                                                           else "") + ".")
    if "python" in different:
        fix += (f" Python {home['python']} differs from {where}'s {node.get('python') or '(none found)'}: "
                f"run home with Python {node.get('python') or '?'}, or give {where} Python {home['python']}.")
    raise VersionSkewError(f"{where} runs other versions than home: {node_text}.\n  home: {describe(home)}\n"
                           f"  {where}: {describe(node) or 'nothing compared'}\n{fix}")
