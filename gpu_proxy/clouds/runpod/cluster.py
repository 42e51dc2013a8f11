"""A Ray cluster on RunPod pods, reached through an SSH tunnel: :class:`RunPodCluster`.

``start()``:

1. checks everything that can be checked for free: the arguments, the API key, the GPU name
   against RunPod's catalog (close names when it is unknown), the GPU count against the largest
   machine, the estimated cost against ``budget_usd``;
2. makes a fresh SSH key pair for this cluster; its public half goes to the pods as ``PUBLIC_KEY``
   (the only thing in the pods' environment besides Ray's settings: RunPod echoes a pod's
   environment back in its API, so no secret may go there);
3. creates the pods from ``image=`` (the node image, ``cluster_image/``) or, without one, from RunPod's
   stock PyTorch image for home's torch (:mod:`.stock_images`), exposing only ``22/tcp``: one pod,
   or for ``nodes > 1`` a head and workers with global networking (workers join the head at
   ``<headPodId>.runpod.internal``) or one Instant Cluster (``POST /v2/clusters``: RunPod makes the
   pods, rank 0 is the head, the others join ``$MASTER_ADDR``); waits, saying what it waits for:
   pods RUNNING, SSH answering, (stock image) home's versions installed and the node started over
   SSH (:mod:`.node_install`), Ray head up, all nodes and GPUs joined;
4. generates the Ray token here and copies it to every pod over SSH as a 0600 file (the node's
   entrypoint waits for it before starting Ray), then tunnels a local port to the dashboard, which
   listens on the head's loopback only;
5. while up: meters the cost (:mod:`.meter`: cost events to the runs, the budget stop) and, with
   ``idle_timeout``, beats a home heartbeat into the head's GCS so the pods' idle watcher knows
   home is here.

The pieces: :mod:`.options` checks the arguments, :mod:`.preflight` the catalog and the price,
:mod:`.launch` creates, waits for, queries and tears down the pods (one object per mode),
:mod:`.bring_up` brings Ray up over SSH, :mod:`.meter` meters the cost; this module sequences the
steps and is the :class:`Cluster` users hold.

``stop()`` terminates every pod this object created (an Instant Cluster is deleted as a whole,
which terminates its pods). A launch that fails at any step terminates what it created before the
error reaches the caller; so does the end of this Python process unless ``keep=True``.
"""
from __future__ import annotations

import logging
import secrets
import sys
import weakref
from pathlib import Path
from typing import Callable, Sequence

from gpu_proxy.clouds.runpod.bring_up import PodAccess, bootstrap_stock_pods, bring_up_ray
from gpu_proxy.clouds.runpod.gpu_types import CostEstimate
from gpu_proxy.clouds.runpod.cost_state import CostState
from gpu_proxy.clouds.runpod.client import RunPodClient
from gpu_proxy.clouds.runpod.held import HeldPods, _teardown
from gpu_proxy.clouds.runpod.launch import InstantClusterLaunch, Launch, NodePlan, PodsLaunch
from gpu_proxy.clouds.runpod.models import Pod
from gpu_proxy.clouds.runpod.options import (IMAGE_ENV, check_money_limits, check_place, check_shape, gpu_choices,
                                             node_image, parse_duration)
from gpu_proxy.clouds.runpod.preflight import Ask, choose_and_estimate, stock_image_plan
from gpu_proxy.clouds.runpod.provision import LaunchError
from gpu_proxy.clusters.base import Endpoint, SSHReachedCluster
from gpu_proxy.clusters.ray_node import DEFAULT_DASHBOARD_PORT, RayPorts, generate_token
from gpu_proxy.errors import GpuProxyError
from gpu_proxy.ssh import SSHTarget, SSHTunnel

log = logging.getLogger(__name__)

__all__ = ["IMAGE_ENV", "RunPodCluster", "parse_duration"]  # the last two: importable from here before the split


def _print_progress(message: str) -> None:
    print(f"gpu-proxy runpod: {message}", file=sys.stderr, flush=True)


class RunPodCluster(CostState, HeldPods, SSHReachedCluster):
    """Ray on RunPod GPU pods, launched by this object and torn down by it.

    Args:
        gpu: a RunPod GPU type: its id (``"NVIDIA H100 80GB HBM3"``), display name (``"H100 SXM"``) or
            an unambiguous part of either; or several (a list, or ``"a,b"``) and memory classes
            (``"any-80gb"``: at least 80 GB): the cheapest in stock now for ``gpus_per_node`` is chosen.
        max_usd_per_hour: refuse to launch above this many USD/hour for the whole cluster (list price).
        gpus_per_node: GPUs per pod (one machine).
        nodes: pods. Above 1: pods with global networking in one data centre that supports it
            (about 100 Mbps between pods), or ``instant_cluster=True`` (see docs/runpod.md).
        instant_cluster: several nodes as one RunPod Instant Cluster (``POST /v2/clusters``): a
            fast interconnect between the nodes, made for multi-node training. Secure cloud only, a
            public image; deleted as a whole on stop, failure, budget or idle.
        idle_timeout: ``"10m"``, ``"1h"`` or seconds: the pods end themselves after this long with no
            Ray Job and no home heartbeat, with RunPod's pod-scoped key (never yours). None: never.
        budget_usd: the most this cluster may cost. Refused before launch when the expected run
            (``expected_hours``) would pass it; while up, a run is stopped with a checkpoint and the
            pods are terminated before the metered spend passes it (home meters it, so it holds
            while a home process holds the cluster; ``idle_timeout`` covers the rest).
        keep: leave the pods running when this Python process ends without ``stop()``.
        image: the node image built from ``cluster_image/Dockerfile`` (the fast start); default
            ``$GPU_PROXY_RUNPOD_IMAGE``; neither: RunPod's stock PyTorch image for home's torch, and each
            pod gets home's gpu-proxy, Ray and framework versions installed over SSH (:mod:`.node_install`).
        requirements: more pip requirements for the stock image's pods (``["einops==0.8.1"]``, or the
            path of a requirements.txt read here); pip_options: extra ``pip install`` arguments.
        cloud: ``"SECURE"`` (RunPod's data centres) or ``"COMMUNITY"``.
        data_centers: preferred data centre ids; empty lets RunPod choose.
        disk_gb: container disk per pod.
        expected_hours: for the cost estimate shown before launch.
        api_key, base_url: see :class:`RunPodClient` (default ``$RUNPOD_API_KEY``, ``$RUNPOD_REST_URL``).
        ray_ports: Ray's ports on the head (default Ray's own); ``worker_ray_ports`` on the workers
            (several nodes on one machine, as in the tests, need distinct ones).
        launch_timeout_s, ssh_timeout_s, ray_timeout_s: how long each stage may take.
        meter_interval_s: how often the cost is metered; budget_grace_s: how long a run stopped by
            the budget may take to commit its checkpoint; checkpoint_margin_s: spend kept in reserve
            for that checkpoint.
        state_dir: where the cluster's SSH key and known_hosts live (default a private temp folder,
            deleted with the pods); ``gpu-proxy up`` keeps them under its config folder.
        progress: called with each progress line; default prints to stderr.
    """

    owns_nodes = True

    def __init__(self, gpu: "str | Sequence[str]", gpus_per_node: int = 1, nodes: int = 1, *,
                 max_usd_per_hour: float | None = None, instant_cluster: bool = False,
                 idle_timeout: "str | float | None" = None, budget_usd: float | None = None, keep: bool = False,
                 image: str | None = None, cloud: str = "SECURE", data_centers: Sequence[str] = (),
                 disk_gb: int = 50, expected_hours: float | None = None, api_key: str | None = None,
                 base_url: str | None = None, ray_ports: RayPorts | None = None,
                 worker_ray_ports: RayPorts | None = None, launch_timeout_s: float = 900.0,
                 ssh_timeout_s: float = 300.0, ray_timeout_s: float = 300.0, meter_interval_s: float = 30.0,
                 budget_grace_s: float = 180.0, checkpoint_margin_s: float = 60.0, state_dir: str | None = None,
                 progress: Callable[[str], None] | None = None, requirements: "Sequence[str] | str" = (),
                 pip_options: Sequence[str] = ()) -> None:
        choices = gpu_choices(gpu)
        check_shape(gpus_per_node, nodes, instant_cluster, cloud)
        self.max_usd_per_hour = check_money_limits(budget_usd, max_usd_per_hour)
        check_place(cloud, data_centers)
        image, self.requirements, self.pip_options = node_image(image, requirements, pip_options)
        self.gpu_choices = choices
        self.gpu = choices[0]  # the chosen type's id once check() ran
        self.gpus_per_node = gpus_per_node
        self.nodes = nodes
        self.instant_cluster = instant_cluster
        self.idle_timeout_s = parse_duration(idle_timeout)
        self.budget_usd = budget_usd
        self.keep = keep
        self.image = image  # None: RunPod's stock PyTorch image, bootstrapped over SSH (chosen by check())
        self.node_image: str | None = image
        self._install = None  # what the stock image's pods get installed (node_install.InstallPlan)
        self.cloud = cloud
        self.data_centers = tuple(data_centers)
        self.disk_gb = disk_gb
        self.expected_hours = expected_hours
        self.ray_ports = ray_ports or RayPorts()
        self.worker_ray_ports = worker_ray_ports or RayPorts()
        self.launch_timeout_s = launch_timeout_s
        self.ssh_timeout_s = ssh_timeout_s
        self.ray_timeout_s = ray_timeout_s
        self.meter_interval_s = meter_interval_s
        self.budget_grace_s = budget_grace_s
        self.checkpoint_margin_s = checkpoint_margin_s
        self.state_dir = state_dir
        self._progress = progress or _print_progress
        self._api_key = api_key
        self._base_url = base_url
        self._client: RunPodClient | None = None
        self.name = f"gpu-proxy-{secrets.token_hex(4)}"
        self.estimate: CostEstimate | None = None
        self.budget_exceeded = False
        self._launch: Launch | None = None  # the pods' launch (one object per mode: .launch), once started
        self._pods: list[Pod] = []
        self._tunnel_box: list[SSHTunnel] = []
        self._token: str | None = None
        self._folder: str | None = None
        self._key_file: str | None = None
        self._token_file = ""
        self._finalizer: weakref.finalize | None = None
        self._bootstrapped: list = []  # the stock image's node bootstraps (node_install.NodeBootstrap)
        self._node_log = ""
        self.bootstrap_s: float | None = None  # how long installing home's versions on the pods took

    def __repr__(self) -> str:  # no key, no token
        cluster = f", instant_cluster={self.cluster_id!r}" if self.instant_cluster else ""
        return (f"RunPodCluster(gpu={self.gpu!r}, gpus_per_node={self.gpus_per_node}, nodes={self.nodes}, "
                f"pods={self._pod_ids}{cluster})")

    def __reduce__(self):
        raise TypeError("a RunPodCluster holds your RunPod API key, the cluster's Ray token and its SSH "
                        "processes; it cannot be pickled.")

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def client(self) -> RunPodClient:
        if self._client is None:
            self._client = RunPodClient(self._api_key, base_url=self._base_url)
        return self._client

    # -- start ----------------------------------------------------------------------------------------------

    def check(self) -> CostEstimate:
        """Everything checkable before money is spent: key, GPU name, count, budget. Returns the estimate."""
        ask = Ask(self.gpu_choices, self.gpus_per_node, self.nodes, self.cloud, self.max_usd_per_hour,
                  self.budget_usd, self.expected_hours)
        estimate = choose_and_estimate(self.client, ask, self._progress)
        if len(self.gpu_choices) > 1 or self.gpu_choices[0].lower().startswith("any"):
            self.gpu = estimate.gpu  # the one chosen
        if self.image is None:
            self.node_image, self._install = stock_image_plan(self.client, self.requirements, self.pip_options,
                                                              self._progress)
        self.estimate = estimate
        return estimate

    def start(self) -> None:
        if self.started:
            return
        if self.budget_exceeded:
            raise GpuProxyError(f"{self!r} was torn down: it reached budget_usd={self.budget_usd:g}.")
        if self._pod_ids or self._cluster_ids:
            raise GpuProxyError(f"{self!r} was started and then lost its tunnel; stop() it and make a new one.")
        try:
            self._start()
        except BaseException:
            failures = self._end()
            if failures:
                self._progress("could not terminate every pod; terminate them in the RunPod console: "
                               + "; ".join(failures))
            raise

    def _plan(self, gpu_id: str) -> NodePlan:
        return NodePlan(name=self.name, image=self.node_image, gpu_id=gpu_id, gpus_per_node=self.gpus_per_node,
                        nodes=self.nodes, cloud=self.cloud, data_centers=self.data_centers, disk_gb=self.disk_gb,
                        public_key=Path(self._key_file).with_suffix(".pub").read_text().strip(),
                        token_file=self._token_file,
                        token_wait_s=int(self.launch_timeout_s + self.ssh_timeout_s + 60),
                        idle_timeout_s=self.idle_timeout_s, ray_ports=self.ray_ports,
                        worker_ray_ports=self.worker_ray_ports, instant_cluster=self.instant_cluster)

    def _start(self) -> None:
        estimate = self.check()
        self._progress(f"estimated cost: {estimate}")
        access = PodAccess.create(self.state_dir, self.name)
        self._folder, self._key_file = access.folder, access.key_file
        suffix = self.name.rsplit("-", 1)[-1]
        self._token_file = f"/tmp/gp-{suffix}/token"  # on the pod; short: Ray's socket paths are length-limited
        self._node_log = f"/tmp/gp-{suffix}/node.log"  # a stock image's node: its output (the image's: pod logs)
        mode = InstantClusterLaunch if self.instant_cluster else PodsLaunch
        self._launch = launch = mode(self.client, self._plan(estimate.gpu), self._progress)
        if not self.keep:  # pods must not outlive this process by accident
            self._finalizer = weakref.finalize(self, _teardown, launch, self._tunnel_box, self._folder, True)
        launch.create()
        self._pods = launch.wait(self.launch_timeout_s)
        if self.nodes > 1 and self._pods[0].data_center_id:
            self._progress(f"{self.nodes} pods in {self._pods[0].data_center_id}")
        if self.image is None:
            self._bootstrap_stock_pods()
        self._bring_up_ray()

    def _bootstrap_stock_pods(self) -> None:
        self._bootstrapped, self.bootstrap_s = bootstrap_stock_pods(
            self._pods, self._access, self._install, self.ssh_timeout_s, self._pod_failure, self._progress,
            self._node_log)

    def _bring_up_ray(self) -> None:
        self._token = generate_token()
        tunnel = bring_up_ray(self._pods, self._access, self._token, self._token_file,
                              self.ray_ports.dashboard or DEFAULT_DASHBOARD_PORT,
                              float(self.gpus_per_node * self.nodes), self.ssh_timeout_s, self.ray_timeout_s,
                              self._pod_failure, lambda: self.resources().get("GPU", 0.0), self._tunnel_box.append,
                              self._progress, stock=self.image is None)
        self._watch()
        self._progress(f"Ray is up on {self.nodes} pod(s); dashboard tunnelled to http://{tunnel.local_address} "
                       f"(${self.cost_per_hour():.2f}/hour while up)")

    @property
    def _access(self) -> PodAccess:
        return PodAccess(self._key_file, self._folder)

    def _ssh_target(self, pod: Pod) -> SSHTarget:
        return self._access.target(pod)

    def _pod_failure(self) -> str | None:
        for pod_id, pod in self._query().items():
            if pod is None or pod.status != "RUNNING":
                member = f" of Instant Cluster {self.cluster_id}" if self.cluster_id else ""
                return f"RunPod pod {pod_id}{member} is {pod.status if pod else 'gone'}: its container stopped."
        # A stock image's pod outlives the node started in it (its sshd keeps it up): ask the node too.
        return next((why for node in self._bootstrapped if (why := node.failure())), None)

    # -- the Cluster interface ------------------------------------------------------------------------------

    def endpoint(self) -> Endpoint:
        if self.budget_exceeded:
            raise GpuProxyError(f"{self!r} was torn down: it reached budget_usd={self.budget_usd:g}.")
        if not self.started:
            raise GpuProxyError(f"{self!r} is not started: call start() (or use it in a with block) first.")
        return Endpoint(f"http://{self._tunnel_box[0].local_address}", self._token)

    def ssh_head(self) -> SSHTarget:
        self.endpoint()  # raises the explanation when the cluster is not up
        return self._tunnel_box[0].target

    def resources(self) -> dict[str, float]:
        from gpu_proxy.clusters.ray_cluster import RayCluster

        endpoint = self.endpoint()
        return RayCluster(endpoint.dashboard_url, token=endpoint.token).resources()

    def stop(self, raise_errors: bool = True) -> None:
        """Terminate every pod this object created (GPU billing ends) and close the tunnel."""
        failures = self._end()
        if failures and raise_errors:
            raise LaunchError("Could not terminate every RunPod pod; terminate them in the RunPod console "
                              "(https://www.runpod.io/console/pods):\n" + "\n".join(failures))

    def saved_state(self) -> dict:
        """What ``gpu-proxy up`` saves to reach these pods again (no secret: the token goes to its own file)."""
        if not self.started:
            raise GpuProxyError(f"{self!r} is not started.")
        return {"kind": "runpod", "name": self.name, "pod_ids": list(self._pod_ids), "cluster_id": self.cluster_id,
                "identity_file": self._key_file, "known_hosts_file": str(Path(self._folder, "known_hosts")),
                "state_dir": self._folder, "dashboard_port": self.ray_ports.dashboard or DEFAULT_DASHBOARD_PORT,
                "launched_at": self._launched_at, "usd_per_hour": self.cost_per_hour(),
                "budget_usd": self.budget_usd, "idle_timeout_s": self.idle_timeout_s, "gpu": self.gpu,
                "gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "base_url": self._base_url,
                "meter_interval_s": self.meter_interval_s}
