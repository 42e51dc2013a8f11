"""A cluster that runs another gpu-proxy version than home is refused before the run, both versions named."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from gpu_proxy import RayCluster, shipping
from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs import RunSpec, execute
from tests.support.ray_head import start_ray_head, stop_ray_head

ROOT = Path(__file__).resolve().parents[2]


def test_a_cluster_with_another_gpu_proxy_version_is_refused_before_the_run(tmp_path, monkeypatch):
    # The cluster's Python imports a copy of gpu-proxy that says it is 0.0.9 (as a node installed
    # from another release would): the run server it starts reports that version.
    other = tmp_path / "other-release"
    for package in ("gpu_proxy", "gpu_proxy_lightning", "gpu_proxy_keras"):
        shutil.copytree(ROOT / package, other / package, ignore=shutil.ignore_patterns("__pycache__"))
    init = other / "gpu_proxy" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', '__version__ = "0.0.9"', init.read_text()))
    monkeypatch.setenv("PYTHONPATH", str(other))
    monkeypatch.chdir(tmp_path)  # the jobs' working directory: not this checkout, whose gpu_proxy would win
    head = start_ray_head(num_cpus=1)
    monkeypatch.delenv("PYTHONPATH")
    try:
        ran: list = []
        spec = RunSpec(shipping.pack(lambda ctx: ran.append(1), "f"), num_workers=1)
        with pytest.raises(ConfigurationError, match=r"home \{'gpu_proxy': '0\.1\.0'.*cluster \{'gpu_proxy': '0\.0\.9'"):
            execute(RayCluster(head.dashboard_url, token=head.token), spec, lambda event: None)
    finally:
        stop_ray_head(head)
