"""The Ray cluster-launcher config (what ``ray up`` reads) for a gpu-proxy cluster on AWS, GCP, Azure
or machines of your own (Ray's ``local`` provider).

What every config carries, whichever the cloud:

* token auth: the Ray token reaches every node as a file (a launcher ``file_mounts`` entry, copied
  by rsync over SSH, mode 0600 kept), never on a command line or in the config; ``ray start`` runs
  with ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` pointing at that file;
* ``--dashboard-host=127.0.0.1``: the dashboard (Jobs API) answers on the head's loopback only and
  home reaches it through ``ssh -L``, as ``ray attach``/``ray dashboard`` do;
* the software: ``pip install`` of the exact Ray and gpu-proxy versions (and the training
  frameworks) installed here, or a Docker image given with ``image=``;
* a head and, for ``nodes > 1``, ``nodes - 1`` workers of the same GPU instance type, all fixed
  (min = max workers): a training run needs all its GPUs at once.
"""
from __future__ import annotations

import importlib.metadata
import shlex
from dataclasses import dataclass, field
from typing import Any, Sequence

from gpu_proxy.clouds.ray_launcher.instances import InstanceType

TOKEN_PATH = "~/.gpu-proxy/ray_token"  # on each node; the launcher copies the local token file there
REMOTE_TOKEN_ENV = "$HOME/.gpu-proxy/ray_token"  # the same, for the shell
FRAMEWORKS = ("torch", "lightning", "keras", "tensorflow", "jax")
# The head's autoscaler launches the workers itself, with the cloud's SDK (as in Ray's own defaults.yaml).
HEAD_SDK = {"aws": ["boto3>=1.4.8"], "gcp": ["google-api-python-client==1.7.8"],
            "azure": ["azure-core==1.35.0", "azure-identity==1.23.1", "azure-mgmt-compute==35.0.0",
                      "azure-mgmt-network==29.0.0", "azure-mgmt-resource==24.0.0", "azure-common==1.1.28",
                      "msrest==0.7.1", "msrestazure==0.6.4.post1"]}


def home_packages() -> list[str]:
    """pip requirements pinning what runs here, so pickled runs unpickle the same on the nodes."""
    import ray

    from gpu_proxy import __version__

    packages = [f"ray[default,train]=={ray.__version__}", f"gpu-proxy=={__version__}"]
    for name in FRAMEWORKS:
        try:
            packages.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return packages


@dataclass
class LauncherSpec:
    """Everything a launcher config is made from. ``cloud`` is ``aws``, ``gcp``, ``azure`` or ``local``."""

    cloud: str
    cluster_name: str
    token_file: str  # the local 0600 file holding the Ray token
    instance: InstanceType | None = None  # None for ``local``
    nodes: int = 1
    region: str | None = None
    zone: str | None = None
    project_id: str | None = None  # gcp
    resource_group: str | None = None  # azure
    image: str | None = None  # a Docker image with Python, Ray and gpu-proxy; default: pip install
    pip_packages: Sequence[str] | None = None  # default: home_packages(); () installs nothing
    disk_gb: int = 200
    ssh_user: str | None = None
    ssh_private_key: str | None = None
    ssh_public_key: str | None = None
    ssh_proxy_command: str | None = None
    head_ip: str | None = None  # local
    worker_ips: Sequence[str] = ()  # local
    ray_executable: str = "ray"
    gcs_port: int = 6379
    dashboard_port: int = 8265
    ray_start_options: Sequence[str] = ()  # extra `ray start` flags (e.g. --temp-dir, ports)
    idle_timeout_minutes: int = 5
    extra: dict[str, Any] = field(default_factory=dict)


def _ray_env() -> str:
    # Ray reads the token from this file on every node; nothing secret on the command line.
    return f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={REMOTE_TOKEN_ENV}"


def start_commands(spec: LauncherSpec) -> tuple[list[str], list[str]]:
    """``head_start_ray_commands``, ``worker_start_ray_commands``."""
    ray = shlex.quote(spec.ray_executable)
    extra = " ".join(shlex.quote(option) for option in spec.ray_start_options)
    head = (f"{_ray_env()}; ulimit -n 65536 2>/dev/null; {ray} start --head --port={spec.gcs_port} "
            f"--dashboard-host=127.0.0.1 --dashboard-port={spec.dashboard_port} "
            f"--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats {extra}").strip()
    worker = (f"{_ray_env()}; ulimit -n 65536 2>/dev/null; {ray} start --address=$RAY_HEAD_IP:{spec.gcs_port} "
              f"--disable-usage-stats {extra}").strip()
    # `ray stop` first only on machines the cloud gave us for this cluster: it stops every Ray process
    # of the machine, so it must never run on a machine of your own that runs other Ray clusters.
    stop = [f"{ray} stop"] if spec.cloud != "local" else []
    if spec.cloud == "local" and spec.head_ip in ("127.0.0.1", "localhost") and not spec.worker_ips:
        # One machine reached on loopback: keep every Ray port there (Ray rewrites 127.0.0.1 to the
        # machine's address unless told not to; see gpu_proxy/clusters/ray_node.py).
        head = head.replace(f"{ray} start --head", f"export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; {ray} start --head "
                            "--node-ip-address=127.0.0.1", 1)
    return stop + [head], stop + [worker]


def _node_config(spec: LauncherSpec) -> dict[str, Any]:
    instance = spec.instance
    assert instance is not None
    if spec.cloud == "aws":
        config: dict[str, Any] = {"InstanceType": instance.name, "BlockDeviceMappings": [
            {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": spec.disk_gb, "VolumeType": "gp3"}}]}
        if spec.extra.get("image_id"):
            config["ImageId"] = spec.extra["image_id"]  # default: Ray's Deep Learning AMI for the region
        return config
    if spec.cloud == "gcp":
        source = spec.extra.get("source_image") or \
            "projects/deeplearning-platform-release/global/images/family/common-cu124-ubuntu-2204-py310"
        config = {"machineType": instance.name,
                  "disks": [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                             "initializeParams": {"diskSizeGb": spec.disk_gb, "sourceImage": source}}],
                  "metadata": {"items": [{"key": "install-nvidia-driver", "value": "True"}]},
                  # GPU machines cannot live-migrate: GCP requires TERMINATE on host maintenance.
                  "scheduling": [{"onHostMaintenance": "TERMINATE", "automaticRestart": True}]}
        if instance.accelerator:
            config["guestAccelerators"] = [{"acceleratorType": instance.accelerator, "acceleratorCount": instance.gpus}]
        return config
    return {"azure_arm_parameters": {"vmSize": instance.name, "imagePublisher": "microsoft-dsvm",
                                     "imageOffer": "ubuntu-2204", "imageSku": "2204-gen2", "imageVersion": "latest",
                                     "osDiskSizeGB": spec.disk_gb}}


def _provider(spec: LauncherSpec) -> dict[str, Any]:
    if spec.cloud == "aws":
        return {"type": "aws", "region": spec.region or "us-east-1", "cache_stopped_nodes": False,
                "use_internal_ips": False}
    if spec.cloud == "gcp":
        region = spec.region or "us-central1"
        return {"type": "gcp", "region": region, "availability_zone": spec.zone or f"{region}-a",
                "project_id": spec.project_id}
    if spec.cloud == "azure":
        return {"type": "azure", "location": spec.region or "eastus", "availability_zone": spec.zone or "auto",
                "resource_group": spec.resource_group or f"gpu-proxy-{spec.cluster_name}", "cache_stopped_nodes": False}
    return {"type": "local", "head_ip": spec.head_ip, "worker_ips": list(spec.worker_ips)}


def build_config(spec: LauncherSpec) -> dict[str, Any]:
    """The launcher config as a dict (``yaml.safe_dump`` it for ``ray up``)."""
    head_start, worker_start = start_commands(spec)
    packages = home_packages() if spec.pip_packages is None else list(spec.pip_packages)
    setup = [f"python3 -m pip install --quiet {' '.join(shlex.quote(p) for p in packages)}"] if packages else []
    auth: dict[str, Any] = {"ssh_user": spec.ssh_user or ("root" if spec.cloud == "local" else "ubuntu")}
    for key in ("ssh_private_key", "ssh_public_key", "ssh_proxy_command"):
        if getattr(spec, key):
            auth[key] = getattr(spec, key)
    config: dict[str, Any] = {
        "cluster_name": spec.cluster_name,
        "max_workers": max(0, spec.nodes - 1) if spec.cloud != "local" else len(spec.worker_ips),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": spec.idle_timeout_minutes,
        "provider": _provider(spec),
        "auth": auth,
        "file_mounts": {TOKEN_PATH: spec.token_file},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": setup,
        "head_setup_commands": [f"python3 -m pip install --quiet {' '.join(shlex.quote(p) for p in HEAD_SDK[spec.cloud])}"]
        if spec.cloud in HEAD_SDK else [],
        "worker_setup_commands": [],
        "head_start_ray_commands": head_start,
        "worker_start_ray_commands": worker_start,
    }
    if spec.image:
        config["docker"] = {"image": spec.image, "container_name": "gpu_proxy_node", "pull_before_run": True,
                            "run_options": ["--ulimit nofile=65536:65536"]}
    if spec.cloud != "local":
        instance = spec.instance
        assert instance is not None
        # An instance type not in our table: {} lets Ray find its CPUs and GPUs itself.
        resources = {"CPU": instance.vcpus, "GPU": instance.gpus} if instance.vcpus else {}
        config["available_node_types"] = {
            "gpu_proxy_head": {"resources": resources, "node_config": _node_config(spec)},
            "gpu_proxy_worker": {"resources": resources, "node_config": _node_config(spec),
                                 "min_workers": spec.nodes - 1, "max_workers": spec.nodes - 1},
        }
        config["head_node_type"] = "gpu_proxy_head"
    return config
