"""From RUNNING pods to a Ray cluster, over SSH: with no image, install home's versions and start the
node on each pod (:mod:`.node_install`); then the Ray token to every pod, the dashboard tunnel, and
every node and GPU joined (the steps :class:`SSHCluster` shares, :mod:`gpu_proxy.clusters.ray_bootstrap`)."""
from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gpu_proxy.clouds.runpod.models import Pod
from gpu_proxy.clouds.runpod.provision import LaunchError
from gpu_proxy.clusters.ray_bootstrap import (Failure, deliver_token, open_dashboard_tunnel, wait_for_nodes_and_gpus,
                                              wait_for_ssh)
from gpu_proxy.ssh import SSHTarget, SSHTunnel

IMAGE_HINT = "Is the image built from cluster_image/Dockerfile (it starts sshd from PUBLIC_KEY)?"
STOCK_HINT = ("The pod runs RunPod's stock image, whose start script runs sshd with PUBLIC_KEY: see the pod's "
              "log in RunPod's console.")


@dataclass(frozen=True)
class PodAccess:
    """How home reaches this cluster's pods: its own key, and its own known_hosts beside it."""

    key_file: str
    folder: str

    @property
    def known_hosts(self) -> str:
        return str(Path(self.folder, "known_hosts"))

    @classmethod
    def create(cls, state_dir: str | None, name: str) -> "PodAccess":
        """A fresh ed25519 key pair for this cluster in ``state_dir`` (default a private temp folder)."""
        if state_dir:
            Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            folder = state_dir
        else:
            folder = tempfile.mkdtemp(prefix="gprp-")
        key = Path(folder, "id_ed25519")
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        return cls(str(key), folder)

    def target(self, pod: Pod) -> SSHTarget:
        direct = pod.ssh_direct
        # A new pod has a new host key: record it on first contact in this cluster's own known_hosts.
        return SSHTarget(direct.host, user=direct.username, port=direct.port, identity_file=self.key_file,
                         known_hosts_file=self.known_hosts, host_key_policy="accept-new")


def node_environments(pods: Sequence[Pod]) -> list[dict[str, str]]:
    """Each stock pod's node environment: what the pod was created with (RunPod echoes it), sshd left to
    the image; a member of an Instant Cluster (``pod.cluster_id``: RunPod's API omits the membership of a
    standalone pod) also gets its rank and addresses from that API (RunPod sets them in the container only:
    a stock image's ssh sessions get RUNPOD_* alone; node/runpod_env.py reads them). ``pods``: rank order."""
    envs = []
    for pod in pods:
        env = {k: v for k, v in dict(pod.raw.get("env") or {}).items() if k != "PUBLIC_KEY"}
        if pod.cluster_id is not None:
            env.update(NODE_RANK=str(pod.cluster_rank), NODE_ADDR=pod.cluster_ip or "",
                       MASTER_ADDR=pods[0].cluster_ip or "", NUM_NODES=str(len(pods)))
        envs.append({**env, "SSHD": "off"})
    return envs


def bootstrap_stock_pods(pods: Sequence[Pod], access: PodAccess, install, ssh_timeout_s: float, failure: Failure,
                         progress: Callable[[str], None], log_file: str) -> tuple[list, float]:
    """Install home's versions on every pod and start the node there (the node image's entrypoint does this
    itself). Returns the node bootstraps (node_install.NodeBootstrap) and how long it took."""
    from gpu_proxy.clouds.runpod.node_install import bootstrap_nodes

    targets = []
    for pod in pods:
        target = access.target(pod)
        progress(f"waiting for SSH on {target.destination} (pod {pod.id})")
        wait_for_ssh(target, ssh_timeout_s, failure, hint=STOCK_HINT, error=LaunchError)
        targets.append(target)
    started = time.monotonic()
    nodes = bootstrap_nodes(targets, node_environments(pods), install, progress, log_file)
    return nodes, time.monotonic() - started


def bring_up_ray(pods: Sequence[Pod], access: PodAccess, token: str, token_file: str, dashboard_port: int,
                 gpus: float, ssh_timeout_s: float, ray_timeout_s: float, failure: Failure,
                 gpus_seen: Callable[[], float], opened: Callable[[SSHTunnel], None],
                 progress: Callable[[str], None], stock: bool = False) -> SSHTunnel:
    """Token to every pod over SSH, the dashboard tunnel, then every node and GPU joined; returns the tunnel.
    ``stock``: the pods run RunPod's stock image (an SSH failure's hint is about that, not the node image)."""
    for pod in pods:
        target = access.target(pod)
        progress(f"waiting for SSH on {target.destination} (pod {pod.id})")
        wait_for_ssh(target, ssh_timeout_s, failure, hint=STOCK_HINT if stock else IMAGE_HINT, error=LaunchError)
        deliver_token([(target, token_file)], token)
    progress("Ray token delivered over SSH; waiting for the Ray head")
    tunnel = open_dashboard_tunnel(access.target(pods[0]), dashboard_port, ray_timeout_s, failure, opened,
                                   error=LaunchError)
    wait_for_nodes_and_gpus(f"http://{tunnel.local_address}", token, len(pods), gpus, ray_timeout_s, failure,
                            gpus_seen=gpus_seen, error=LaunchError)
    progress(f"all {len(pods)} node(s) and {gpus:g} GPU(s) joined")
    return tunnel
