"""The versions that must agree between home and every node, and the check that they do.

A model pickled at home must unpickle on the nodes (cloudpickle, the framework), and Ray's wire
protocol is not compatible across versions: so Python (major.minor), gpu-proxy, Ray, and whichever
of torch/Lightning and Keras/TensorFlow home runs must be the same on the nodes. The probe is a
stdlib-only script, so it runs on a node before anything of ours is installed there.
"""
from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Mapping

from gpu_proxy.errors import ConfigurationError

# What is compared, by distribution name (a TensorFlow build may be named tensorflow or tensorflow-cpu).
PACKAGES: dict[str, tuple[str, ...]] = {
    "gpu-proxy": ("gpu-proxy",), "ray": ("ray",), "cloudpickle": ("cloudpickle",), "torch": ("torch",),
    "lightning": ("lightning",), "keras": ("keras",), "tensorflow": ("tensorflow", "tensorflow-cpu"),
}

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
    """What this process runs, for every compared package installed here."""
    found = {"python": "%d.%d" % sys.version_info[:2]}
    for key, dists in PACKAGES.items():
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
    """Names the gpu-proxy code of the source tree at ``root`` (``pyproject.toml`` and every ``gpu_proxy*``
    module): two trees of one version number with other code get other digests."""
    digest = hashlib.sha256()
    for path in sorted(p for p in [root / "pyproject.toml", *root.glob("gpu_proxy*/**/*.py")] if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def mismatches(home: Mapping[str, str], node: Mapping[str, str]) -> list[str]:
    """The compared names (those home has) whose versions differ on the node (or are missing there)."""
    return [name for name in ("python", *PACKAGES) if name in home
            and public_version(node.get(name) or "") != public_version(home[name])]


def describe(versions: Mapping[str, str]) -> str:
    return ", ".join(f"{name} {versions[name]}" for name in ("python", *PACKAGES) if name in versions)


def check_same_versions(home: Mapping[str, str], node: Mapping[str, str], where: str) -> None:
    """Raise :class:`VersionSkewError` naming both lists when ``where`` differs from home."""
    different = mismatches(home, node)
    if different:
        node_text = ", ".join(f"{name} {node.get(name) or 'missing'}" for name in different)
        raise VersionSkewError(
            f"{where} runs other versions than home ({node_text}).\n  home: {describe(home)}\n  {where}: "
            f"{describe(node) or 'nothing compared'}\nInstall the same versions on both sides (on RunPod: leave "
            f"image= unset and gpu-proxy installs home's versions on the pods, or rebuild the image with "
            f"`python cluster_image/build_args.py`).")
