"""One word picks the provider: each name resolves to the right cluster object with its options (nothing is
launched), ``clusters.toml`` configures names (never secrets), ``GPU_PROXY_CLUSTER`` switches a script's
``Trainer(strategy="remote_gpu")``, and unknown names or options fail at once, listing the valid ones."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpu_proxy.clusters.providers import RemoteGPU
from gpu_proxy.clusters.resolve import check_cluster_spec, resolve_cluster
from gpu_proxy.errors import ConfigurationError


@pytest.fixture(autouse=True)
def config_dir(tmp_path, monkeypatch):
    """A private config folder per test (never the user's), and no GPU_PROXY_CLUSTER from outside."""
    monkeypatch.setenv("GPU_PROXY_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("GPU_PROXY_CLUSTER", raising=False)
    monkeypatch.setenv("GPU_PROXY_RUNPOD_IMAGE", "registry.example.com/node:1")
    return tmp_path


def write_toml(config_dir, text: str) -> None:
    (config_dir / "clusters.toml").write_text(text)


def test_each_provider_name_builds_its_cluster_with_the_options_given():
    from gpu_proxy.clouds.ray_launcher import LauncherCluster
    from gpu_proxy.clouds.runpod import RunPodCluster
    from gpu_proxy.clouds.runpod.serverless import RunPodServerless
    from gpu_proxy.clusters.local import LocalCluster, default_local_cluster
    from gpu_proxy.clusters.ray_cluster import RayCluster
    from gpu_proxy.clusters.ssh import SSHCluster

    assert resolve_cluster("local") is default_local_cluster() is RemoteGPU("local")
    local = RemoteGPU("local", num_cpus=1)
    assert type(local) is LocalCluster and local.num_cpus == 1 and local is not default_local_cluster()

    pods = RemoteGPU("runpod", gpu="H100 SXM", gpus_per_node=8, nodes=2, budget_usd=40, idle_timeout="10m")
    assert type(pods) is RunPodCluster
    assert (pods.gpu, pods.gpus_per_node, pods.nodes, pods.budget_usd, pods.idle_timeout_s) == ("H100 SXM", 8, 2, 40, 600)
    assert pods.pod_ids == []  # built, not launched

    serverless = RemoteGPU("runpod_serverless", endpoint_id="abc123", api_key="k", gpus_per_worker=2)
    assert type(serverless) is RunPodServerless and serverless.endpoint_id == "abc123"

    ssh = resolve_cluster("ssh://me@10.0.0.5:2222")
    assert type(ssh) is SSHCluster and (ssh.head.user, ssh.head.host, ssh.head.port) == ("me", "10.0.0.5", 2222)
    ssh = RemoteGPU("ssh://me@10.0.0.5", workers=["me@10.0.0.6"], num_gpus=1)
    assert [w.host for w in ssh.workers] == ["10.0.0.6"]

    for cloud, gpu, instance in (("aws", "A10G", "g5.xlarge"), ("gcp", "L4", "g2-standard-8"),
                                 ("azure", "T4", "Standard_NC4as_T4_v3")):
        options = {"project_id": "p"} if cloud == "gcp" else {}
        cluster = RemoteGPU(cloud, gpu=gpu, nodes=2, region="r1", **options)
        assert type(cluster) is LauncherCluster and cluster.cloud == cloud
        assert cluster.instance.name == instance and cluster.nodes == 2

    ray = resolve_cluster("http://127.0.0.1:8265")
    assert type(ray) is RayCluster and ray.address == "http://127.0.0.1:8265"


def test_a_saved_name_and_a_configured_name_resolve_with_their_definitions(config_dir):
    from gpu_proxy.clouds.ray_launcher import SavedLauncherCluster
    from gpu_proxy.clouds.runpod import RunPodCluster
    from gpu_proxy.clusters.ray_cluster import RayCluster

    token = config_dir / "tok"
    token.write_text("t0k")
    (config_dir / "clusters.json").write_text(json.dumps({
        "lab": {"kind": "ray", "address": "http://127.0.0.1:9999"},
        "cloud": {"kind": "ray_launcher", "cloud": "aws", "head": "ubuntu@203.0.113.7", "dashboard_port": 8265,
                  "token_file": str(token), "config_file": "/nonexistent.yaml", "usd_per_hour": 2.0,
                  "launched_at": 0}}))
    write_toml(config_dir, '[big]\nprovider = "runpod"\ngpu = ["H100 SXM", "A100 80GB"]\ngpus_per_node = 4\n'
                           'max_usd_per_hour = 20\n')
    lab = resolve_cluster("lab")
    assert type(lab) is RayCluster and lab.address == "http://127.0.0.1:9999"
    cloud = resolve_cluster("cloud")
    assert type(cloud) is SavedLauncherCluster and cloud.target.host == "203.0.113.7" and cloud.owns_nodes
    big = resolve_cluster("big")
    assert type(big) is RunPodCluster
    assert (big.gpu_choices, big.gpus_per_node, big.max_usd_per_hour) == (("H100 SXM", "A100 80GB"), 4, 20)
    assert RemoteGPU("big", gpus_per_node=8).gpus_per_node == 8  # keyword arguments override the table


def test_the_environment_variable_switches_a_scripts_trainer_with_no_code_change(config_dir, monkeypatch):
    import lightning as L

    import gpu_proxy_lightning  # noqa: F401
    from gpu_proxy.clouds.ray_launcher import LauncherCluster
    from gpu_proxy.clouds.runpod import RunPodCluster
    from gpu_proxy.clusters.local import default_local_cluster

    write_toml(config_dir, '[runpod]\ngpu = "RTX A4000"\nidle_timeout = "10m"\n\n[aws]\ngpu = "A10G"\nnodes = 2\n')
    script = lambda: L.Trainer(strategy="remote_gpu", accelerator="cpu", devices=1,  # noqa: E731
                               logger=False, enable_checkpointing=False).strategy.resolved_cluster()
    assert script() is default_local_cluster()
    monkeypatch.setenv("GPU_PROXY_CLUSTER", "runpod")
    cluster = script()
    assert type(cluster) is RunPodCluster and cluster.gpu == "RTX A4000" and cluster.idle_timeout_s == 600
    monkeypatch.setenv("GPU_PROXY_CLUSTER", "aws")
    cluster = script()
    assert type(cluster) is LauncherCluster and cluster.instance.name == "g5.xlarge" and cluster.nodes == 2
    monkeypatch.setenv("GPU_PROXY_CLUSTER", "rnupod")
    with pytest.raises(ConfigurationError, match=r"GPU_PROXY_CLUSTER='rnupod'.*'runpod'"):
        script()


def test_an_unknown_name_lists_the_providers_and_the_configured_and_saved_names(config_dir):
    (config_dir / "clusters.json").write_text(json.dumps({"lab": {"kind": "ray", "address": "http://127.0.0.1:1"}}))
    write_toml(config_dir, '[big]\nprovider = "runpod"\ngpu = "H100 SXM"\n')
    for attempt in (lambda: resolve_cluster("rundpod"), lambda: RemoteGPU("rundpod"),
                    lambda: check_cluster_spec("rundpod")):
        with pytest.raises(ConfigurationError) as raised:
            attempt()
        message = str(raised.value)
        assert "'rundpod'" in message
        for name in ("'local'", "'runpod'", "'runpod_serverless'", "'aws'", "'gcp'", "'azure'", "ssh://",
                     "http://", "big", "lab"):
            assert name in message, name


def test_unknown_and_missing_options_fail_naming_them_before_anything_is_built(config_dir):
    with pytest.raises(ConfigurationError, match=r"provider 'runpod' has no option 'gpus'.*Valid options: gpu, "
                                                 r"gpus_per_node"):
        RemoteGPU("runpod", gpus="H100")
    with pytest.raises(ConfigurationError, match=r"provider 'aws' has no option 'regoin'.*region"):
        RemoteGPU("aws", gpu="A10G", regoin="us-west-2")
    with pytest.raises(ConfigurationError, match=r"provider 'runpod' needs 'gpu'.*\[runpod\] table"):
        resolve_cluster("runpod")
    write_toml(config_dir, '[x]\nprovider = "gcp"\ngpu = "L4"\nproject_id = "p"\nzones = "a"\n')
    with pytest.raises(ConfigurationError, match=r"clusters.toml \[x\]: provider 'gcp' has no option 'zones'"):
        check_cluster_spec("x")  # what RemoteStrategy(cluster="x") can call at construction
    with pytest.raises(ConfigurationError, match="ssh://user@host"):
        resolve_cluster("ssh://10.0.0.5")


@pytest.mark.parametrize("key", ["api_key", "token", "aws_secret_access_key", "password"])
def test_secrets_are_refused_in_the_config_file_with_where_they_belong(config_dir, key):
    write_toml(config_dir, f'[pods]\nprovider = "runpod"\ngpu = "H100 SXM"\n{key} = "s3cr3t"\n')
    with pytest.raises(ConfigurationError) as raised:
        resolve_cluster("pods")
    message = str(raised.value)
    assert f"'{key}' is a secret" in message and "RUNPOD_API_KEY" in message and "s3cr3t" not in message


def test_run_commands_refuse_a_bare_provider_name_that_would_launch_a_cluster(config_dir):
    import os

    done = subprocess.run([sys.executable, "-m", "gpu_proxy.cli", "stop", "r1", "-c", "aws"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, GPU_PROXY_CONFIG_DIR=str(config_dir)))
    assert done.returncode == 1 and "names a provider, which would launch a new cluster" in done.stderr
