"""The stock-image path's decisions, without pods: which RunPod image, which Python on the pod, what
gets pinned. The pod's shell is a local bash with a chosen PATH (the bootstrap's own prelude, not a
copy of it); the installs themselves run on the stand-in pods (test_runpod_stock.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from gpu_proxy.clouds.runpod import node_install
from gpu_proxy.clouds.runpod.models import Template
from gpu_proxy.clouds.runpod.node_install import (InstallPlan, NodeBootstrap, _with_dependencies,
                                                  build_project_wheel, prelude, runtime_pins)
from gpu_proxy.clouds.runpod.stock_images import STOCK_PYTORCH, _torch_of, best_listed, choose_stock_image, usable
from gpu_proxy.ssh import SSHTarget
from gpu_proxy.versions import VersionSkewError, home_versions, project_root

ROOT = Path(__file__).resolve().parents[2]
HOME_PYTHON = "%d.%d" % sys.version_info[:2]

# A catalog as RunPod could serve it: several tags per torch, CUDA 13 ones, 1.0.x Ubuntu 22.04 variants,
# the older naming, a serverless image.
MIXED = ["runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2204",  # python3 is 3.10 there, torch is 3.12's
         "runpod/pytorch:1.0.3-cu1300-torch280-ubuntu2404",  # CUDA 13: not on RunPod's pods
         "runpod/pytorch:1.0.1-cu1281-torch280-ubuntu2404",
         "runpod/pytorch:1.0.3-cu1281-torch280-ubuntu2404",  # the one for torch 2.8
         "runpod/pytorch:1.0.3-cu1290-torch280-ubuntu2404",
         "runpod/pytorch:1.0.3-cu1300-torch2100-ubuntu2404",  # torch 2.10 only on CUDA 13: never
         "runpod/pytorch:1.0.3-cu1300-torch290-ubuntu2404",
         "runpod/pytorch:1.0.3-cu1281-torch290-ubuntu2204",  # torch 2.9 only here usable: none
         "runpod/pytorch:2.9.0-py3.12-cuda13.0.0-devel-ubuntu24.04",
         "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04",
         "runpod/pytorch:2.1.0-py3.10-cuda11.8.0-devel-ubuntu22.04"]


def _catalog(images: list[str]) -> list[Template]:
    raw = [{"id": f"t{i}", "name": image, "image": image, "serverless": False} for i, image in enumerate(images)]
    raw.append({"id": "sls", "name": "worker", "image": "runpod/pytorch:1.0.9-cu1281-torch280-ubuntu2404",
                "serverless": True})
    return [Template.from_json(item) for item in raw]


def test_the_table_holds_cuda_12_8_ubuntu_24_04_tags_of_the_torch_each_names():
    assert set(STOCK_PYTORCH) >= {"2.6", "2.7", "2.8", "2.9"}
    assert STOCK_PYTORCH["2.9"] == "runpod/pytorch:1.0.3-cu1281-torch291-ubuntu2404"
    assert STOCK_PYTORCH["2.8"] == "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"
    for minor, image in STOCK_PYTORCH.items():
        assert _torch_of(image) == minor and "-cu1281-" in image and image.endswith("-ubuntu2404") and usable(image)
    listed = _catalog(list(STOCK_PYTORCH.values()) + MIXED)
    assert choose_stock_image("2.9.1+cu128", listed) == STOCK_PYTORCH["2.9"]  # the table wins over other tags
    assert choose_stock_image("2.6.0", listed) == STOCK_PYTORCH["2.6"]
    assert choose_stock_image("2.13.0", listed) == STOCK_PYTORCH["2.9"]  # newer than all: the newest, torch over it


def test_a_mixed_catalog_gives_cuda_12_8_on_ubuntu_24_04_never_cuda_13_nor_the_22_04_variants():
    catalog = _catalog(MIXED)
    assert choose_stock_image("2.8.0", catalog) == "runpod/pytorch:1.0.3-cu1281-torch280-ubuntu2404"
    assert choose_stock_image("2.8.0", list(reversed(catalog))) == "runpod/pytorch:1.0.3-cu1281-torch280-ubuntu2404"
    # torch 2.9 and 2.10 only on CUDA 13 or Ubuntu 22.04 1.0.x tags: the newest usable torch, 2.8.
    assert choose_stock_image("2.10.0", catalog) == "runpod/pytorch:1.0.3-cu1281-torch280-ubuntu2404"
    assert choose_stock_image("2.4.1", catalog) == "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
    chosen = best_listed(MIXED).values()
    assert not [image for image in chosen if "cu13" in image or "cuda13" in image or "-ubuntu2204" in image
                and image.startswith("runpod/pytorch:1.")]
    # No CUDA 12.8.1 tag for a torch: the other CUDA 12 tag on Ubuntu 24.04, not the 22.04 variant.
    assert best_listed(["runpod/pytorch:1.0.3-cu1281-torch280-ubuntu2204",
                        "runpod/pytorch:1.0.3-cu1290-torch280-ubuntu2404"]) == {
        "2.8": "runpod/pytorch:1.0.3-cu1290-torch280-ubuntu2404"}


def test_the_choice_does_not_depend_on_the_hash_seed():
    script = ("import json, sys; from tests.image.test_runpod_stock_units import MIXED, _catalog; "
              "from gpu_proxy.clouds.runpod.stock_images import choose_stock_image; "
              "print(json.dumps([choose_stock_image(t, _catalog(MIXED)) for t in ('2.8.0', '2.13.0', None)]))")
    answers = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT,
                              env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}).stdout
               for seed in ("1", "2")}
    assert len(answers) == 1
    assert json.loads(answers.pop()) == ["runpod/pytorch:1.0.3-cu1281-torch280-ubuntu2404"] * 3


# ---- which Python on the pod ---------------------------------------------------------------------------

def _pod_bin(tmp_path: Path, pythons: dict[str, str]) -> Path:
    """A pod's PATH: each name a stand-in interpreter answering the probe as that Python minor."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, minor in pythons.items():
        answer = json.dumps({"python": minor, "python_executable": str(folder / name)})
        script = folder / name
        script.write_text(f"#!/bin/bash\nif [ \"$1\" = -c ]; then echo /nonexistent; exit 0; fi\n"
                          f"cat >/dev/null\necho '{answer}'\n")
        script.chmod(0o755)
    return folder


def _local_pod(monkeypatch, folder: Path) -> None:
    """The bootstrap's commands run in a local bash whose PATH is only ``folder`` (no system Python)."""
    def run_remote(target, script, input=None, timeout_s=None, check=True):
        env = {"PATH": str(folder), "GPU_PROXY_RP_ENVIRONMENT": "/nonexistent"}
        return subprocess.run(["/bin/bash", "-c", script], input=input or "", capture_output=True, text=True,
                              env=env, timeout=timeout_s, check=check)
    monkeypatch.setattr(node_install, "run_remote", run_remote)


def _node(label: str = "node 1/1") -> NodeBootstrap:
    plan = InstallPlan(home={**home_versions(), "python": HOME_PYTHON}, project_wheel=None)
    return NodeBootstrap(SSHTarget("pod.invalid"), plan, label, lambda line: None)


def test_the_pod_python_of_home_minor_is_taken_over_its_python3(tmp_path, monkeypatch):
    # As on runpod/pytorch:1.0.x-...-ubuntu2404: python3 is 3.12, and home's minor is there too.
    folder = _pod_bin(tmp_path, {"python3": "3.12", f"python{HOME_PYTHON}": HOME_PYTHON})
    _local_pod(monkeypatch, folder)
    found = _node().probe()
    assert found["python"] == HOME_PYTHON and found["python_executable"] == str(folder / f"python{HOME_PYTHON}")
    assert f"command -v python{HOME_PYTHON} || command -v python3" in prelude(HOME_PYTHON)
    with pytest.raises(ValueError):
        prelude("3.11; rm -rf /")


def test_a_pod_without_home_python_fails_naming_both_pythons(tmp_path, monkeypatch):
    folder = _pod_bin(tmp_path, {"python3": "3.12"})  # falls back to python3, whose 3.12 is no match
    _local_pod(monkeypatch, folder)
    node = _node("node 2/2")
    assert node.probe()["python_executable"] == str(folder / "python3")
    with pytest.raises(VersionSkewError) as skew:
        node.install()
    text = str(skew.value)
    assert f"python 3.12 (home {HOME_PYTHON})" in text and f"no python{HOME_PYTHON}" in text
    assert "RunPod node 2/2" in text and "image=" in text


# ---- what is pinned ------------------------------------------------------------------------------------

def test_gpu_proxy_dependencies_are_pinned_to_home_versions():
    root = project_root()
    if root is None:
        pytest.skip("gpu-proxy is not imported from a source tree")
    pins = runtime_pins(build_project_wheel(root))
    for dist in ("numpy", "fsspec", "packaging", "requests", "urllib3", "psutil", "cloudpickle"):
        assert f"{dist}=={metadata.version(dist)}" in pins, dist
    assert f"ray[default]=={metadata.version('ray')}" in pins
    if "lightning" in home_versions():  # lightning requires pytorch-lightning unpinned: pinned here
        assert f"pytorch-lightning=={metadata.version('pytorch-lightning')}" in pins
    assert not [pin for pin in pins if pin.startswith(("s3fs", "optuna", "keras"))]  # extras are not dependencies
    # A compared package that differs keeps its own pin; the dependency's is not added twice.
    merged = _with_dependencies(["ray[default]==2.60.0"], ["ray[default]==2.60.0", "numpy==2.0.0"])
    assert merged == ["ray[default]==2.60.0", "numpy==2.0.0"]
