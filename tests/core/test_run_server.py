"""A cluster's run server (gpu_proxy.runs.server) on a real `ray start --head` given by address."""
from __future__ import annotations

import os
import pickle
import re
import secrets
import socket
import time

import pytest

from gpu_proxy import RayCluster, shipping
from gpu_proxy.errors import ConfigurationError
from gpu_proxy.runs import RunSpec, execute, values, wire
from gpu_proxy.runs.job import JobRun
from gpu_proxy.runs.server_client import ServerClient, _check_versions, _servers


def cluster(ray_head) -> RayCluster:
    return RayCluster(ray_head.dashboard_url, token=ray_head.token)


def pid(ctx):
    return os.getpid()


def wait_for_stop(ctx):
    started = time.monotonic()
    while not ctx.should_stop() and time.monotonic() - started < 60:
        time.sleep(0.05)
    return "stopped" if ctx.should_stop() else "ran out its time"


def run(ray_head, fn, **spec_args):
    spec = RunSpec(shipping.pack(fn, "the test's function"), num_workers=1, worker_pool="server-test", **spec_args)
    return execute(cluster(ray_head), spec, lambda event: None)


def test_the_second_run_by_address_is_warm_the_cli_shows_its_workers_and_down_ends_them(ray_head, capsys,
                                                                                        monkeypatch, tmp_path):
    started = time.monotonic()
    (first,) = values(run(ray_head, pid))
    cold_s = time.monotonic() - started
    started = time.monotonic()
    (second,) = values(run(ray_head, pid))
    warm_s = time.monotonic() - started
    assert second == first  # the same worker process, kept by the cluster's run server
    assert warm_s < cold_s
    status = ServerClient(cluster(ray_head)).request("status")
    assert any(g["kind"] == "server-test" and g["state"] == "idle" for g in status["pool"])

    from gpu_proxy.cli import main

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)  # where the CLI finds the token
    assert main(["status", ray_head.dashboard_url]) == 0
    assert "1 server-test idle" in capsys.readouterr().out

    monkeypatch.setenv("GPU_PROXY_CONFIG_DIR", str(tmp_path))
    assert main(["up", "ray", "--address", ray_head.dashboard_url, "--name", "warm"]) == 0
    assert main(["down", "warm"]) == 0  # the cluster is only forgotten; its warm workers end
    assert re.search(r"ended \d+ group\(s\) of warm workers", capsys.readouterr().out)
    assert not any(g["state"] == "idle" for g in ServerClient(cluster(ray_head)).request("status")["pool"])
    deadline = time.monotonic() + 10
    while _alive(first) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(first)


def _alive(process_id: int) -> bool:
    import psutil

    try:
        return psutil.Process(process_id).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_connection_without_a_registered_key_is_refused(ray_head):
    client = ServerClient(cluster(ray_head))
    sock, _ = client.connect()  # starts the server if it is not running; this home's key is registered
    sock.close()
    host, port = client._cluster.server_address(*_servers[(ray_head.dashboard_url, client.key)])
    with socket.create_connection((host, port), timeout=10) as stranger:
        with pytest.raises(wire.WireError, match="does not know that key"):
            wire.client_handshake(stranger, secrets.token_bytes(32))


def test_a_run_whose_home_went_away_stops_and_the_server_says_why(ray_head):
    client = ServerClient(cluster(ray_head))
    spec = RunSpec(shipping.dumps(wait_for_stop), num_workers=1, worker_pool="server-test")
    sock, _ = client.connect()
    wire.send(sock, {"op": "run", "spec": pickle.dumps(spec), "secrets": {}})
    while wire.receive(sock)["event"]["kind"] != "run_started":
        pass
    sock.close()  # home is gone: its process ended
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        (record,) = [r for r in client.request("status")["runs"] if r["run_id"] == spec.name]
        status = record["status"]
        if status != "RUNNING":
            break
        time.sleep(0.3)
    assert status == "STOPPED (home closed the connection)"
    from gpu_proxy.runs.attach import list_runs

    (info,) = [r for r in list_runs(cluster(ray_head)) if r.run_id == spec.name]  # `gpu-proxy runs` shows it
    assert info.status == "STOPPED (home closed the connection)"


def test_idle_server_workers_give_way_to_a_detached_run_of_another_kind(ray_head):
    everything = int(cluster(ray_head).resources()["CPU"])
    spec = RunSpec(shipping.pack(pid, "f"), num_workers=everything, worker_pool="holds-everything")
    values(execute(cluster(ray_head), spec, lambda event: None))  # the server's pool now holds every CPU
    detached = RunSpec(shipping.dumps(pid), num_workers=everything, placement_timeout_s=30)
    started = time.monotonic()
    job = JobRun.submit(cluster(ray_head).endpoint(), detached)
    outcomes = job.follow(lambda event: None)
    assert len(values(outcomes)) == everything
    assert time.monotonic() - started < 25  # the server's idle workers yielded; no placement timeout
    assert not any(g["kind"] == "holds-everything" for g in ServerClient(cluster(ray_head)).request("status")["pool"])


def test_clear_ends_the_warm_workers(ray_head):
    values(run(ray_head, pid))
    client = ServerClient(cluster(ray_head))
    assert client.request("clear")["cleared"] >= 1
    assert not [g for g in client.request("status")["pool"] if g["state"] == "idle"]


def test_version_skew_names_both_sides():
    from gpu_proxy.runs.server import versions

    with pytest.raises(ConfigurationError, match=r"ray 0\.0\.1 \(home .*\n  home: .*ray .*\n  the cluster: .*ray 0\.0\.1"):
        _check_versions({**versions(), "ray": "0.0.1"})


def test_gpu_proxy_stop_stops_a_run_of_the_server(ray_head):
    import threading

    from gpu_proxy.runs.attach import stop_run

    spec = RunSpec(shipping.pack(wait_for_stop, "f"), num_workers=1, worker_pool="server-test")
    started, result = threading.Event(), {}

    def follow():
        result["outcomes"] = execute(cluster(ray_head), spec,
                                     lambda event: started.set() if event.kind == "run_started" else None)

    home = threading.Thread(target=follow)
    home.start()
    assert started.wait(60)
    assert stop_run(spec.name, cluster(ray_head)) is True  # as `gpu-proxy stop RUN -c CLUSTER`
    home.join(60)
    assert values(result["outcomes"]) == ["stopped"]
    assert stop_run(spec.name, cluster(ray_head)) is False  # it had ended


def test_logs_of_a_run_of_the_server_say_where_it_ran(ray_head, capsys, monkeypatch):
    from gpu_proxy.cli import main

    spec = RunSpec(shipping.pack(pid, "f"), num_workers=1, worker_pool="server-test")
    values(execute(cluster(ray_head), spec, lambda event: None))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", ray_head.token_path)
    assert main(["logs", spec.name, "-c", ray_head.dashboard_url]) == 1
    said = capsys.readouterr().err
    assert f"run '{spec.name}' (SUCCEEDED) ran on cluster" in said and "detach=True" in said
