"""AWS, GCP and Azure GPU clusters made by Ray's own cluster launcher: :class:`LauncherCluster`.

gpu-proxy writes the launcher config (:mod:`.config`: instance type from :mod:`.instances`, token
auth, loopback dashboard), and Ray's launcher API (``ray.autoscaler.sdk.create_or_update_cluster``,
``teardown_cluster``, the same code as ``ray up``/``ray down``) creates and deletes the machines,
with the cloud credentials Ray finds as usual (``~/.aws``, ``gcloud auth application-default
login``, ``az login``). Home then reaches the head's dashboard through ``ssh -L`` with the SSH key
the launcher used, as ``ray dashboard`` does. Ray's cloud SDKs (boto3, google-api-python-client,
azure-*) are imported by Ray only when a cluster of that cloud is launched.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

from gpu_proxy.clouds.ray_launcher.config import LauncherSpec, build_config
from gpu_proxy.clouds.ray_launcher.instances import CLOUDS, InstanceType, find_instance, instance_for
from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.clusters.ray_node import generate_token, wait_for_nodes
from gpu_proxy.clusters.tunneled import TunneledRayCluster
from gpu_proxy.errors import ConfigurationError, GpuProxyError

LAUNCHER_CLOUDS = CLOUDS + ("local",)


def _print_progress(message: str) -> None:
    print(f"gpu-proxy launcher: {message}", file=sys.stderr, flush=True)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def _close_ssh_masters(cluster_name: str) -> None:
    """End the SSH connections Ray's launcher keeps open (``ControlPersist``) to the cluster's machines, so
    that ``down`` leaves no process behind here. The folder is the one Ray's SSH runner computes."""
    import getpass
    import hashlib
    import subprocess

    from ray.autoscaler._private.command_runner import HASH_MAX_LENGTH

    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:HASH_MAX_LENGTH]
    folder = Path("/tmp", f"ray_ssh_{user}", hashlib.sha256(cluster_name.encode()).hexdigest()[:HASH_MAX_LENGTH])
    for socket_path in folder.glob("*") if folder.is_dir() else []:
        subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "gpu-proxy-launcher"],
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=10, check=False)


def teardown(config_file: str, folder: str | None = None) -> None:
    """``ray down`` through Ray's launcher API; then delete the cluster's folder (token, config)."""
    import yaml
    from ray.autoscaler.sdk import teardown_cluster

    teardown_cluster(config_file)
    _close_ssh_masters(yaml.safe_load(Path(config_file).read_text())["cluster_name"])
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


class LauncherCluster(TunneledRayCluster):
    """A GPU cluster on ``cloud`` made by Ray's cluster launcher, torn down by ``stop()``.

    Args:
        cloud: ``"aws"``, ``"gcp"``, ``"azure"``, or ``"local"`` (machines of your own: ``head_ip``,
            ``worker_ips``, ``ssh_user``, ``ssh_private_key``; Ray's on-prem provider).
        gpu: ``"A10G"``, ``"L4"``, ``"T4"``, ``"A100"``, ``"A100 80GB"``, ``"H100"``... (see instances.py).
        gpus_per_node, nodes: GPUs per machine and machines (the head is one of them).
        region, zone: where (defaults: us-east-1 / us-central1 / eastus). project_id: GCP project.
        resource_group: Azure resource group (default ``gpu-proxy-<name>``).
        instance_type: the cloud's type name, instead of choosing one from ``gpu``.
        image: a Docker image with Python, Ray and gpu-proxy (default: ``pip install`` of the versions
            installed here). pip_packages: what to install instead (``()``: nothing).
        keep: leave the machines up when this Python process ends without ``stop()``.
        name: the launcher's cluster name (default ``gpu-proxy-<random>``).
        state_dir: where the config, the token file and known_hosts live (default a private temp folder).
        ssh_port: the head's sshd port (``local`` only; Ray's launcher reaches it through a relay).
    """

    owns_nodes = True

    def __init__(self, cloud: str, gpu: str | None = None, gpus_per_node: int = 1, nodes: int = 1, *,
                 region: str | None = None, zone: str | None = None, project_id: str | None = None,
                 resource_group: str | None = None, instance_type: str | None = None, image: str | None = None,
                 pip_packages: Sequence[str] | None = None, disk_gb: int = 200, keep: bool = False,
                 name: str | None = None, state_dir: str | None = None, head_ip: str | None = None,
                 worker_ips: Sequence[str] = (), ssh_user: str | None = None, ssh_private_key: str | None = None,
                 ssh_port: int = 22, ray_executable: str = "ray", ray_start_options: Sequence[str] = (),
                 gcs_port: int = 6379, dashboard_port: int = 8265, idle_timeout_minutes: int = 5,
                 start_timeout_s: float = 1200.0, progress: Callable[[str], None] | None = None) -> None:
        import secrets

        if cloud not in LAUNCHER_CLOUDS:
            raise ConfigurationError(f"cloud={cloud!r}: use one of {', '.join(LAUNCHER_CLOUDS)}.")
        if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
            raise ConfigurationError(f"nodes={nodes!r} must be a whole number >= 1.")
        self.cloud = cloud
        self.instance: InstanceType | None = None
        if cloud == "local":
            if not head_ip:
                raise ConfigurationError("cloud='local' needs head_ip='10.0.0.5' (and worker_ips=[...], ssh_user=, "
                                         "ssh_private_key=): Ray's on-prem provider runs Ray on machines you name.")
        elif instance_type:
            self.instance = find_instance(cloud, instance_type) or InstanceType(
                cloud, instance_type, gpu or "GPU", gpus_per_node, 0, 0.0)
        elif gpu:
            self.instance = instance_for(cloud, gpu, gpus_per_node)
        else:
            raise ConfigurationError(f"cloud={cloud!r} needs gpu='A10G' (or instance_type='...'): which GPUs to rent.")
        if cloud == "gcp" and not project_id:
            raise ConfigurationError("cloud='gcp' needs project_id='my-project' (your GCP project's id).")
        self.name = name or f"gpu-proxy-{secrets.token_hex(4)}"
        self.nodes = nodes if cloud != "local" else 1 + len(worker_ips)
        self.keep = keep
        self.state_dir = state_dir
        self.start_timeout_s = start_timeout_s
        self._progress = progress or _print_progress
        self._folder: str | None = None
        self._finalizer: weakref.finalize | None = None
        self._launched_at: float | None = None
        self._head: str | None = None
        self._spec = LauncherSpec(
            cloud=cloud, cluster_name=self.name, token_file="", instance=self.instance, nodes=self.nodes,
            region=region, zone=zone, project_id=project_id, resource_group=resource_group, image=image,
            pip_packages=pip_packages, disk_gb=disk_gb, ssh_user=ssh_user, ssh_private_key=ssh_private_key,
            head_ip=head_ip, worker_ips=tuple(worker_ips), ray_executable=ray_executable,
            gcs_port=gcs_port, dashboard_port=dashboard_port, ray_start_options=tuple(ray_start_options),
            idle_timeout_minutes=idle_timeout_minutes)
        if ssh_port != 22:
            if cloud != "local":
                raise ConfigurationError(f"ssh_port={ssh_port}: only cloud='local' machines may use another SSH port.")
            self._spec.ssh_proxy_command = (f"{sys.executable} -m gpu_proxy.clouds.ray_launcher.relay "
                                            f"{head_ip} {int(ssh_port)}")
        self.ssh_port = ssh_port
        self.dashboard_port = dashboard_port
        self._token: str | None = None
        self._tunnel = None
        self.target = None  # the head's SSHTarget, known once the launcher made it

    def __repr__(self) -> str:
        return f"LauncherCluster(cloud={self.cloud!r}, instance={self.instance.name if self.instance else None!r}, " \
               f"nodes={self.nodes}, name={self.name!r})"

    def __reduce__(self):
        raise TypeError("a LauncherCluster holds a Ray token and an SSH tunnel; it cannot be pickled.")

    @property
    def usd_per_hour(self) -> float:
        return (self.instance.usd_per_hour if self.instance else 0.0) * self.nodes

    def estimate(self) -> str:
        if self.instance is None:
            return f"{self.nodes} machine(s) of your own: no cloud charge"
        price = f"~${self.instance.usd_per_hour:.2f}/hour each = ~${self.usd_per_hour:.2f}/hour" \
            if self.instance.usd_per_hour else "price unknown (not in gpu-proxy's table)"
        return (f"{self.nodes} x {self.instance.name} ({self.instance.gpus} x {self.instance.gpu}) on {self.cloud}: "
                f"{price} (on-demand list price; disks and egress extra; billed until `down`)")

    def config(self, token_file: str | None = None) -> dict[str, Any]:
        """The launcher config ``start()`` uses (``--dry-run`` prints it). It names the token *file*, never the token."""
        self._spec.token_file = token_file or str(Path(self._folder or self.state_dir or "<state dir>", "ray_token"))
        return build_config(self._spec)

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def config_file(self) -> str:
        return str(Path(self._folder or "", "ray-cluster.yaml"))

    # -- start / stop ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._tunnel is not None and self._tunnel.is_open:
            return
        if self._folder is not None:
            raise GpuProxyError(f"{self!r} was started before and lost its tunnel; stop() it and make a new one.")
        import yaml
        from ray.autoscaler.sdk import create_or_update_cluster, get_head_node_ip

        if self.state_dir:
            Path(self.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            self._folder = self.state_dir
        else:
            self._folder = tempfile.mkdtemp(prefix="gprl-")
        self._token = generate_token()
        token_file = Path(self._folder, "ray_token")
        _write_private(token_file, self._token)
        config = self.config(str(token_file))
        _write_private(Path(self.config_file), yaml.safe_dump(config, sort_keys=False))
        if not self.keep:
            self._finalizer = weakref.finalize(self, teardown, self.config_file, self._folder)
        self._progress(f"launching with Ray's cluster launcher: {self.estimate()}")
        self._launched_at = time.time()
        try:
            applied = create_or_update_cluster(self.config_file)
            auth = applied.get("auth", {})
            head_ip = self._spec.head_ip if self.cloud == "local" else get_head_node_ip(self.config_file)
            self._head = f"{auth.get('ssh_user', 'ubuntu')}@{head_ip}:{self.ssh_port}"
            self._identity_file = auth.get("ssh_private_key")
            self._open(self._head, self._identity_file)
            self._progress(f"head {head_ip} is up; waiting for {self.nodes} node(s) in Ray")
            wait_for_nodes(self.endpoint().dashboard_url, self._token, self.nodes, timeout_s=self.start_timeout_s)
        except BaseException:
            self._teardown_now()  # a failed launch never leaves machines billing, keep or not
            raise
        self._progress(f"Ray is up on {self.nodes} node(s); dashboard tunnelled to {self.endpoint().dashboard_url}")

    def _open(self, head: str, identity_file: str | None) -> None:
        TunneledRayCluster.__init__(self, head, self.dashboard_port, token=self._token, identity_file=identity_file,
                                    known_hosts_file=str(Path(self._folder, "known_hosts")))
        TunneledRayCluster.start(self)

    def endpoint(self) -> Endpoint:
        if self._tunnel is None:
            raise GpuProxyError(f"{self!r} is not started: call start() (or use it in a with block) first.")
        return super().endpoint()

    def saved_state(self) -> dict[str, Any]:
        """What ``gpu-proxy up`` saves (no secret: the token stays in its 0600 file)."""
        return {"kind": "ray_launcher", "cloud": self.cloud, "name": self.name, "config_file": self.config_file,
                "head": self._head, "identity_file": self._identity_file, "state_dir": self._folder,
                "known_hosts_file": str(Path(self._folder, "known_hosts")), "dashboard_port": self.dashboard_port,
                "token_file": str(Path(self._folder, "ray_token")), "usd_per_hour": self.usd_per_hour,
                "launched_at": self._launched_at, "nodes": self.nodes,
                "instance_type": self.instance.name if self.instance else None}

    def detach(self) -> None:
        """Leave the machines up (``gpu-proxy up``): only this process's tunnel closes."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        TunneledRayCluster.stop(self)

    def stop(self) -> None:
        """Close the tunnel and tear the machines down with Ray's launcher (``ray down``)."""
        self._teardown_now()

    def _teardown_now(self) -> None:
        TunneledRayCluster.stop(self)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._folder and Path(self.config_file).exists():
            self._progress(f"tearing {self.name} down with Ray's cluster launcher")
            teardown(self.config_file, self._folder)


class SavedLauncherCluster(TunneledRayCluster):
    """A cluster ``gpu-proxy up aws|gcp|azure`` made, opened again by name; ``terminate()`` is ``down``."""

    owns_nodes = True

    def __init__(self, name: str, definition: dict[str, Any]) -> None:
        token_file = Path(definition["token_file"])
        if not token_file.is_file():
            raise ConfigurationError(f"saved cluster {name!r}: its token file {token_file} is missing; "
                                     f"`gpu-proxy down {name}` tears its machines down.")
        super().__init__(definition["head"], int(definition["dashboard_port"]), token=token_file.read_text().strip(),
                         identity_file=definition.get("identity_file"),
                         known_hosts_file=definition.get("known_hosts_file"))
        self.name = name
        self.definition = definition

    def cost(self) -> dict[str, float | None]:
        """List price x time since launch (the clouds' own bill is the truth)."""
        rate = float(self.definition.get("usd_per_hour") or 0.0)
        hours = (time.time() - float(self.definition.get("launched_at") or time.time())) / 3600
        return {"spent_usd": rate * hours, "usd_per_hour": rate, "budget_usd": None}

    def terminate(self) -> None:
        self.stop()
        if not os.path.exists(self.definition["config_file"]):
            raise GpuProxyError(f"saved cluster {self.name!r}: its launcher config {self.definition['config_file']} "
                                f"is gone; delete the machines in the {self.definition['cloud']} console.")
        teardown(self.definition["config_file"], self.definition.get("state_dir"))
