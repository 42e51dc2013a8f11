"""A cluster that runs another gpu-proxy, Ray, Python or framework version than home is refused before
the run, both versions named; the cluster's versions come from its run server (gpu_proxy.versions)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import gpu_proxy
from gpu_proxy import RayCluster, shipping
from gpu_proxy.runs import RunSpec, execute
from gpu_proxy.runs.server_client import _check_versions
from gpu_proxy.versions import VersionSkewError, home_versions
from tests.support.ray_head import start_ray_head, stop_ray_head

ROOT = Path(__file__).resolve().parents[2]
HOME = home_versions()


def _refused_on(path: Path, tmp_path: Path, monkeypatch) -> str:
    """Start a Ray head whose Python has ``path`` first on sys.path; a run there must be refused before it
    runs. Returns the error's text."""
    monkeypatch.setenv("PYTHONPATH", str(path))
    monkeypatch.chdir(tmp_path)  # the jobs' working directory: not this checkout, whose gpu_proxy would win
    head = start_ray_head(num_cpus=1)
    monkeypatch.delenv("PYTHONPATH")
    try:
        ran: list = []
        spec = RunSpec(shipping.pack(lambda ctx: ran.append(1), "f"), num_workers=1)
        with pytest.raises(VersionSkewError) as skew:
            execute(RayCluster(head.dashboard_url, token=head.token), spec, lambda event: None)
        assert ran == []
        return str(skew.value)
    finally:
        stop_ray_head(head)


def test_a_cluster_with_another_gpu_proxy_version_is_refused_before_the_run(tmp_path, monkeypatch):
    # The cluster's Python imports a copy of gpu-proxy that says it is 0.0.9 (as a node installed
    # from another release would): the run server it starts reports that version.
    other = tmp_path / "other-release"
    for package in ("gpu_proxy", "gpu_proxy_lightning", "gpu_proxy_keras"):
        shutil.copytree(ROOT / package, other / package, ignore=shutil.ignore_patterns("__pycache__"))
    init = other / "gpu_proxy" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', '__version__ = "0.0.9"', init.read_text()))
    assert gpu_proxy.__version__ != "0.0.9"
    text = _refused_on(other, tmp_path, monkeypatch)
    assert f"gpu-proxy 0.0.9 (home {gpu_proxy.__version__})" in text
    assert f"home: python {HOME['python']}, gpu-proxy {gpu_proxy.__version__}, ray {HOME['ray']}" in text
    assert f"the cluster: python {HOME['python']}, gpu-proxy 0.0.9, ray {HOME['ray']}" in text
    assert "pip install 'gpu-proxy==" in text


def test_a_cluster_with_another_framework_version_is_refused_before_the_run(tmp_path, monkeypatch):
    # The cluster's Python finds a Lightning 2.5.0 distribution before the one installed here: its run
    # server reports it, and home (which has another Lightning) refuses before the run.
    name = "lightning" if "lightning" in HOME else "keras" if "keras" in HOME else None
    if name is None:
        pytest.skip("home has neither Lightning nor Keras")
    other = tmp_path / "other-framework"
    info = other / f"{name}-2.5.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 2.5.0\n")
    text = _refused_on(other, tmp_path, monkeypatch)
    assert f"{name} 2.5.0 (home {HOME[name]})" in text and f"{name} {HOME[name]}" in text
    assert f"pip install '{name}=={HOME[name]}'" in text
    assert "gpu-proxy" not in text.split("\n")[0]  # only the framework differs


def test_the_check_tolerates_build_tags_and_frameworks_the_cluster_lacks():
    home = dict(HOME)
    same = {**home, **{name: f"{home[name]}+cu128" for name in ("torch",) if name in home}}
    _check_versions(same)  # torch 2.13.0+cpu at home, +cu128 on the cluster: the same API
    bare = {name: version for name, version in home.items() if name not in ("torch", "lightning", "keras",
                                                                             "tensorflow")}
    _check_versions(bare)  # a cluster without Keras runs Lightning runs
    old = {**bare, "gpu_proxy": bare.pop("gpu-proxy")}  # a server of gpu-proxy 0.1.0 named itself so
    _check_versions(old)
    for name, other in (("torch", "2.12.0"), ("cloudpickle", "2.0.0"), ("python", "3.9")):
        if name in home:
            with pytest.raises(VersionSkewError, match=re.escape(f"{name} {other} (home {home[name]})")):
                _check_versions({**home, name: other})
