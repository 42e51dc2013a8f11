"""``gpu-proxy dashboard`` (gpu_proxy/cli.py): it holds the cluster open exactly when the URL it printed
answers only while this process does."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpu_proxy import cli
from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.clusters.ray_cluster import RayCluster
from gpu_proxy.clusters.tunneled import TunneledRayCluster


def _dashboard(monkeypatch, capsys, cluster) -> tuple[int, list[str], list[str]]:
    """Run `gpu-proxy dashboard c` on ``cluster`` (started and stopped without a network); a wait for
    Ctrl-C gets one at once. Returns the exit code, the printed lines and what happened to the cluster."""
    calls: list[str] = []
    monkeypatch.setattr(cluster, "start", lambda: calls.append("start"), raising=False)
    monkeypatch.setattr(cluster, "stop", lambda: calls.append("stop"), raising=False)
    monkeypatch.setattr(cluster, "endpoint", lambda: Endpoint("http://127.0.0.1:50123"), raising=False)
    monkeypatch.setattr("gpu_proxy.clusters.resolve.resolve_cluster", lambda name: cluster)

    def ctrl_c(seconds: float) -> None:
        calls.append("wait")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "time", SimpleNamespace(sleep=ctrl_c))
    code = cli.main(["dashboard", "c"])
    return code, capsys.readouterr().out.splitlines(), calls


def test_a_cluster_by_address_prints_its_url_and_returns(monkeypatch, capsys):
    code, lines, calls = _dashboard(monkeypatch, capsys, RayCluster("http://10.0.0.5:8265"))
    assert (code, lines, calls) == (0, ["http://127.0.0.1:50123"], ["start"])  # the URL outlives this process


class _ATunnelOfMyOwn(TunneledRayCluster):
    """A subclass (as the launcher's clusters are): what counts is being reached over SSH, not the class name."""


@pytest.mark.parametrize("cls", [TunneledRayCluster, _ATunnelOfMyOwn])
def test_a_cluster_reached_over_ssh_holds_its_tunnel_until_ctrl_c(monkeypatch, capsys, cls):
    cluster = cls("me@head")
    assert not cluster.owns_nodes  # `gpu-proxy dashboard ...` on a head someone else started
    code, lines, calls = _dashboard(monkeypatch, capsys, cluster)
    assert code == 0 and lines == ["http://127.0.0.1:50123", "(tunnel open; Ctrl-C closes it)"]
    assert calls == ["start", "wait", "stop"]  # Ctrl-C closes what this process held
