"""AWS, GCP and Azure through Ray's own cluster launcher: the configs gpu-proxy writes validate against the
schema Ray ships and carry the instance type, token auth (a file, never the token) and a loopback dashboard;
and `gpu-proxy up` runs end to end through Ray's launcher API on a stand-in machine (Ray's on-prem provider,
a real sshd in a PID namespace of its own), a fit runs on it by name, and `down` leaves no Ray process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from gpu_proxy.clouds.ray_launcher import LauncherCluster
from gpu_proxy.clouds.ray_launcher.config import TOKEN_PATH
from gpu_proxy.clouds.ray_launcher.instances import instance_for
from gpu_proxy.errors import ConfigurationError

SCHEMA = json.loads(Path(ray.__file__).parent.joinpath("autoscaler", "ray-schema.json").read_text())
CLI = [sys.executable, "-m", "gpu_proxy.cli"]
CLOUDS = [("aws", "A10G", 1, "g5.xlarge", {"region": "us-west-2"}),
          ("aws", "H100", 8, "p5.48xlarge", {}),
          ("gcp", "A100 80GB", 8, "a2-ultragpu-8g", {"project_id": "my-project"}),
          ("gcp", "T4", 4, "n1-standard-32", {"project_id": "my-project"}),
          ("azure", "A100-80GB", 1, "Standard_NC24ads_A100_v4", {"resource_group": "rg"})]


def node_type(config: dict, name: str) -> str:
    node = config["available_node_types"][name]["node_config"]
    return node.get("InstanceType") or node.get("machineType") or node["azure_arm_parameters"]["vmSize"]


@pytest.mark.parametrize("cloud,gpu,per_node,instance,options", CLOUDS)
def test_launcher_configs_validate_against_rays_schema_with_instance_types_token_auth_and_loopback_dashboard(
        cloud, gpu, per_node, instance, options):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = LauncherCluster(cloud, gpu, per_node, 3, **options).config("/home/me/.config/gpu-proxy/tokens/x")
    jsonschema.validate(config, SCHEMA)
    validate_config(prepare_config(config))  # Ray's own check (fills its defaults first), as `ray up` does
    assert node_type(config, "gpu_proxy_head") == node_type(config, "gpu_proxy_worker") == instance
    worker = config["available_node_types"]["gpu_proxy_worker"]
    assert worker["min_workers"] == worker["max_workers"] == config["max_workers"] == 2  # all GPUs at once
    assert worker["resources"]["GPU"] == per_node
    if instance.startswith("n1-"):
        assert worker["node_config"]["guestAccelerators"][0]["acceleratorCount"] == per_node
    # Token auth: Ray reads the token from a file the launcher copies to every node; no token in the config.
    assert config["file_mounts"] == {TOKEN_PATH: "/home/me/.config/gpu-proxy/tokens/x"}
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = commands[-1]
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=$HOME/.gpu-proxy/ray_token" in start
        assert "RAY_AUTH_TOKEN=" not in start
    head = config["head_start_ray_commands"][-1]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in yaml.safe_dump(config)
    assert f"ray[default,train]=={ray.__version__}" in config["setup_commands"][0]


def test_instance_table_refuses_what_a_cloud_does_not_sell_and_names_what_it_does():
    assert instance_for("aws", "nvidia a10g", 4).name == "g5.12xlarge"
    with pytest.raises(ConfigurationError, match=r"no instance type with 2 x A10G; it has 1, 4, 8 per machine"):
        instance_for("aws", "A10G", 2)
    with pytest.raises(ConfigurationError, match=r"gcp has no A10G.*listed on aws"):
        instance_for("gcp", "A10G", 1)
    with pytest.raises(ConfigurationError, match=r"Did you mean 'H100'"):
        instance_for("aws", "H10O", 8)
    with pytest.raises(ConfigurationError, match="project_id"):
        LauncherCluster("gcp", "L4")


def test_up_dry_run_prints_the_estimate_and_the_config_and_launches_nothing(tmp_path):
    env = dict(os.environ, GPU_PROXY_CONFIG_DIR=str(tmp_path))
    done = subprocess.run([*CLI, "up", "aws", "--gpu", "A10G", "--gpus-per-node", "1", "--nodes", "2", "--region",
                           "eu-west-1", "--dry-run", "--name", "try"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "estimated cost: 2 x g5.xlarge (1 x A10G) on aws: ~$1.01/hour each = ~$2.01/hour" in done.stdout
    config = yaml.safe_load(done.stdout.split("\n", 1)[1].rsplit("(dry run", 1)[0])
    assert config["provider"] == {"type": "aws", "region": "eu-west-1", "cache_stopped_nodes": False,
                                  "use_internal_ips": False}
    assert config["file_mounts"][TOKEN_PATH] == str(tmp_path / "ray_launcher" / "try" / "ray_token")
    assert not (tmp_path / "clusters.json").exists() and not (tmp_path / "ray_launcher" / "try").exists()


# ---- end to end on a stand-in machine ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def machine():
    from tests.support.namespaced_sshd import (namespace_missing_reason, start_namespaced_sshd,
                                               stop_namespaced_sshd_process)

    reason = namespace_missing_reason()
    if reason:
        pytest.skip(reason)
    server = start_namespaced_sshd()
    yield server
    stop_namespaced_sshd_process(server.process)


def cli(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.timeout(300)
def test_up_through_rays_launcher_then_a_fit_by_name_then_down_leaves_no_ray_process(machine, tmp_path, monkeypatch):
    config = tmp_path / "config"
    monkeypatch.setenv("GPU_PROXY_CONFIG_DIR", str(config))
    env = dict(os.environ, GPU_PROXY_CONFIG_DIR=str(config))
    started = time.monotonic()
    up = cli("up", "onprem", "--head", f"{machine.user}@127.0.0.1:{machine.port}", "--identity-file",
             machine.private_key, "--ray-executable", str(Path(sys.executable).parent / "ray"), "--free-ports",
             "--name", "lab", env=env)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        _use_and_tear_down(machine, tmp_path, config, env, up, started)
    finally:
        if "lab" in json.loads((config / "clusters.json").read_text() if (config / "clusters.json").exists() else "{}"):
            cli("down", "lab", env=env)  # a failed check still tears the cluster down
        shutil.rmtree("/tmp/gp-lab", ignore_errors=True)  # the head's Ray temp dir (--free-ports)


def _use_and_tear_down(machine, tmp_path, config, env, up, started):
    from gpu_proxy.clusters.resolve import resolve_cluster
    from tests.lightning_project.models import fit_and_check_against_rank0

    assert "cluster 'lab' is up: 1 node(s)" in up.stdout
    up_s = time.monotonic() - started
    definition = json.loads((config / "clusters.json").read_text())["lab"]
    token = Path(definition["token_file"]).read_text().strip()
    assert definition["kind"] == "ray_launcher" and oct(os.stat(definition["token_file"]).st_mode & 0o777) == "0o600"
    launcher_config = Path(definition["config_file"]).read_text()
    assert token not in launcher_config and "--dashboard-host=127.0.0.1" in launcher_config
    assert machine.ray_processes(), "Ray runs inside the stand-in machine"
    assert Path(machine.home, ".gpu-proxy", "ray_token").read_text().strip() == token  # delivered as a file

    cluster = resolve_cluster("lab")  # a saved launcher cluster: tunnel to the head's loopback dashboard
    cluster.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is on
            urllib.request.urlopen(cluster.endpoint().dashboard_url + "/api/jobs/", timeout=10)
        assert refused.value.code == 401
        fit_and_check_against_rank0(cluster, tmp_path)
    finally:
        cluster.stop()  # only this process's tunnel

    missing = cli("logs", "no-such-run", "-c", "lab", env=env)  # issue 20: a sentence and the recent runs
    assert missing.returncode == 1 and "no run 'no-such-run' on cluster 'lab'" in missing.stderr
    assert "Recent runs there" in missing.stderr and "SUCCEEDED" in missing.stderr
    assert "Traceback" not in missing.stderr
    run_id = missing.stderr.split("Recent runs there:\n")[1].splitlines()[1].split()[0]
    missing = cli("attach", "no-such-run", "-c", "lab", env=env, timeout=60)
    assert missing.returncode == 1 and "no run 'no-such-run' on cluster 'lab'" in missing.stderr
    assert run_id in missing.stderr and "Traceback" not in missing.stderr
    stopped = cli("stop", run_id, "-c", "lab", env=env)
    assert stopped.returncode == 0 and f"run {run_id!r} had already ended" in stopped.stdout

    down = cli("down", "lab", env=env)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "torn down with Ray's cluster launcher" in down.stdout
    assert machine.ray_processes() == []
    relays = subprocess.run(["pgrep", "-f", f"ray_launcher.relay 127.0.0.1 {machine.port}"], capture_output=True)
    assert relays.stdout == b"", "no SSH connection of the launcher is left open here"
    assert "lab" not in json.loads((config / "clusters.json").read_text())
    assert not Path(definition["state_dir"]).exists()  # token and config gone with it
    print(f"up {up_s:.1f} s, whole case {time.monotonic() - started:.1f} s")


def test_no_cloud_sdk_is_imported_to_build_configs_or_resolve_names():
    code = ("import sys, gpu_proxy\n"
            "for cloud, extra in (('aws', {}), ('gcp', {'project_id': 'p'}), ('azure', {})):\n"
            "    gpu_proxy.RemoteGPU(cloud, gpu='T4', **extra).config('/t')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'googleapiclient', "
            "'azure')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
