"""A Ray cluster on RunPod pods, reached through an SSH tunnel: :class:`RunPodCluster`.

``start()``:

1. checks everything that can be checked for free: the arguments, the API key, the GPU name
   against RunPod's catalog (close names when it is unknown), the GPU count against the largest
   machine, the estimated cost against ``budget_usd``;
2. makes a fresh SSH key pair for this cluster; its public half goes to the pods as ``PUBLIC_KEY``
   (the only thing in the pods' environment besides Ray's settings: RunPod echoes a pod's
   environment back in its API, so no secret may go there);
3. creates the pods from the node image (``cluster_image/``), exposing only ``22/tcp``: one pod,
   or for ``nodes > 1`` a head and workers with global networking (workers join the head at
   ``<headPodId>.runpod.internal``) or one Instant Cluster (``POST /v2/clusters``: RunPod makes the
   pods, rank 0 is the head, the others join ``$MASTER_ADDR``); waits, saying what it waits for:
   pods RUNNING, SSH answering, Ray head up, all nodes and GPUs joined;
4. generates the Ray token here and copies it to every pod over SSH as a 0600 file (the node's
   entrypoint waits for it before starting Ray), then tunnels a local port to the dashboard, which
   listens on the head's loopback only;
5. while up: meters the cost (:mod:`.meter`: cost events to the runs, the budget stop) and, with
   ``idle_timeout``, beats a home heartbeat into the head's GCS so the pods' idle watcher knows
   home is here.

The pieces: :mod:`.launch` creates, waits for, queries and tears down the pods (one object per
mode), :mod:`.ray_bootstrap` brings Ray up over SSH, :mod:`.meter` meters the cost; this module
validates the arguments, sequences the steps and is the :class:`Cluster` users hold.

``stop()`` terminates every pod this object created (an Instant Cluster is deleted as a whole,
which terminates its pods). A launch that fails at any step terminates what it created before the
error reaches the caller; so does the end of this Python process unless ``keep=True``.
"""
from __future__ import annotations

import logging
import math
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable, Sequence

from gpu_proxy.clouds.runpod.catalog import (CLOUDS, CostEstimate, check_count, check_money, choose_gpu, estimate_cost,
                                             expand_choices, resolve_gpu)
from gpu_proxy.clouds.runpod.client import RunPodClient
from gpu_proxy.clouds.runpod.launch import InstantClusterLaunch, Launch, NodePlan, PodsLaunch
from gpu_proxy.clouds.runpod.meter import CostMeter
from gpu_proxy.clouds.runpod.models import Pod
from gpu_proxy.clouds.runpod.provision import LaunchError
from gpu_proxy.clouds.runpod.ray_bootstrap import (deliver_token, open_dashboard_tunnel, wait_for_nodes_and_gpus,
                                                   wait_for_ssh)
from gpu_proxy.clusters.base import Endpoint, SSHReachedCluster
from gpu_proxy.clusters.ray_node import DEFAULT_DASHBOARD_PORT, RayPorts, generate_token
from gpu_proxy.errors import ConfigurationError, GpuProxyError
from gpu_proxy.ssh import SSHTarget, SSHTunnel

log = logging.getLogger(__name__)

IMAGE_ENV = "GPU_PROXY_RUNPOD_IMAGE"


def parse_duration(value: "str | float | int | None", what: str = "idle_timeout") -> float | None:
    """``600``, ``"600"``, ``"90s"``, ``"10m"``, ``"1h"`` -> seconds; None -> None."""
    if value is None:
        return None
    text = str(value).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        seconds = -1
    if not math.isfinite(seconds) or seconds <= 0:  # "nan" and "inf" parse as floats, and would crash later
        raise ConfigurationError(f"{what}={value!r}: give a positive duration, e.g. 600, '90s', '10m' or '1h'.")
    return seconds


def _requirement_list(value: "Sequence[str] | str") -> tuple[str, ...]:
    """Requirements as given, or read from a requirements.txt path (comments and blank lines dropped)."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigurationError(f"requirements={value!r}: give a list of requirements (['einops==0.8.1']) or "
                                     f"the path of a requirements.txt.")
        value = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return tuple(item.strip() for item in value if item and item.strip())


def _print_progress(message: str) -> None:
    print(f"gpu-proxy runpod: {message}", file=sys.stderr, flush=True)


def _teardown(launch: Launch | None, tunnel_box: list, folder: str | None, quiet: bool = False) -> list[str]:
    """Close the tunnel, end what the launch made, delete the key folder once nothing is left. Never
    references the cluster object (it also runs as a finalizer at interpreter exit)."""
    for tunnel in tunnel_box:
        tunnel.close()
    tunnel_box.clear()
    failures = launch.teardown(quiet=quiet) if launch is not None else []
    if folder and (launch is None or (not launch.pod_ids and not launch.cluster_ids)):
        shutil.rmtree(folder, ignore_errors=True)
    return failures


class RunPodCluster(SSHReachedCluster):
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
        import os

        if isinstance(gpu, (list, tuple)) and gpu and all(isinstance(g, str) and g.strip() for g in gpu):
            choices = tuple(g.strip() for g in gpu)  # the cheapest available of these, chosen at launch
        elif isinstance(gpu, str) and gpu.strip():
            choices = tuple(p.strip() for p in gpu.split(",") if p.strip())
        else:
            raise ConfigurationError(f"gpu={gpu!r}: give a RunPod GPU type, e.g. 'NVIDIA H100 80GB HBM3', a list "
                                     f"(['H100 SXM', 'A100 80GB']: the cheapest available) or 'any-80gb'.")
        if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
            raise ConfigurationError(f"gpus_per_node={gpus_per_node!r} must be a whole number >= 1.")
        if not isinstance(nodes, int) or nodes < 1:
            raise ConfigurationError(f"nodes={nodes!r} must be a whole number >= 1.")
        if instant_cluster and nodes < 2:
            raise ConfigurationError(f"instant_cluster=True needs nodes >= 2 (got nodes={nodes}): one node is one pod.")
        if instant_cluster and cloud != "SECURE":
            raise ConfigurationError(f"instant_cluster=True with cloud={cloud!r}: RunPod's Instant Clusters run on its "
                                     f"secure cloud only (their create request has no cloud); use cloud='SECURE'.")
        check_money(budget_usd, "budget_usd")
        self.max_usd_per_hour = check_money(max_usd_per_hour, "max_usd_per_hour")
        if cloud not in CLOUDS:
            raise ConfigurationError(f"cloud={cloud!r}: use 'SECURE' or 'COMMUNITY'.")
        if isinstance(data_centers, str):
            raise ConfigurationError(f"data_centers={data_centers!r}: pass a list, e.g. ['US-TX-3'].")
        image = image or os.environ.get(IMAGE_ENV) or None
        self.requirements = _requirement_list(requirements)
        self.pip_options = tuple(pip_options)
        if (self.requirements or self.pip_options) and image is not None:
            raise ConfigurationError("requirements=/pip_options= are installed on pods started from RunPod's stock "
                                     "image; with image= put them in the image instead (or drop image=).")
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
        self._meter: CostMeter | None = None
        self._heartbeat = None
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

    @property
    def _pod_ids(self) -> list[str]:
        return self._launch.pod_ids if self._launch is not None else []

    @property
    def _cluster_ids(self) -> list[str]:
        return self._launch.cluster_ids if self._launch is not None else []

    @property
    def _launched_at(self) -> float | None:
        """Wall clock of the first pod's creation, so a saved cluster can go on metering."""
        return self._launch.launched_at if self._launch is not None else None

    @property
    def pod_ids(self) -> list[str]:
        return list(self._pod_ids)

    @property
    def cluster_id(self) -> str | None:
        """The Instant Cluster's id (``instant_cluster=True``), once RunPod made it."""
        return self._cluster_ids[0] if self._cluster_ids else None

    @property
    def started(self) -> bool:
        return self._token is not None and bool(self._tunnel_box) and self._tunnel_box[0].is_open

    @property
    def token(self) -> str | None:
        return self._token

    @property
    def head(self) -> SSHTarget:
        if not self._pods:
            raise GpuProxyError(f"{self!r} has no pod yet: call start().")
        return self._ssh_target(self._pods[0])

    def cost_per_hour(self) -> float:
        """What the pods cost per hour, as RunPod last reported them (the catalog estimate before launch)."""
        if self._meter is not None:
            return self._meter.usd_per_hour
        if self._pods:
            return sum(pod.cost_per_hour for pod in self._pods)
        return self.estimate.per_hour if self.estimate else 0.0

    def spent_usd(self) -> float:
        """Metered spend since the first pod was created (RunPod bills per second)."""
        if self._meter is not None:
            return self._meter.spent_usd()
        if self._launched_at is None:
            return 0.0
        return self.cost_per_hour() * (time.time() - self._launched_at) / 3600

    def cost(self) -> dict[str, float | None]:
        """The cost meter: ``spent_usd``, ``usd_per_hour``, ``budget_usd`` (``gpu-proxy status`` shows it)."""
        return {"spent_usd": self.spent_usd(), "usd_per_hour": self.cost_per_hour(), "budget_usd": self.budget_usd}

    def _query(self) -> dict[str, Pod | None]:
        """Every pod of this cluster as RunPod reports it now (None: gone). An Instant Cluster's pods are
        read through the cluster (``/v2/clusters/{id}/pods``)."""
        return self._launch.query() if self._launch is not None else {}

    def _pods_rate(self) -> float:
        """USD per hour of the pods now, from RunPod (a pod gone or stopped costs nothing); every member of
        an Instant Cluster counts."""
        return sum(pod.cost_per_hour for pod in self._query().values() if pod is not None and pod.status != "EXITED")

    # -- start ----------------------------------------------------------------------------------------------

    def check(self) -> CostEstimate:
        """Everything checkable before money is spent: key, GPU name, count, budget. Returns the estimate."""
        if len(self.gpu_choices) > 1 or self.gpu_choices[0].lower().startswith("any"):
            # A choice: the live catalog, read with availability for this many GPUs per pod.
            catalog = self.client.gpu_types(availability=True, count=self.gpus_per_node, cloud=self.cloud)
            gpu = choose_gpu(expand_choices(self.gpu_choices, catalog, self.cloud), self.gpus_per_node, self.nodes,
                             self.cloud, self.max_usd_per_hour)
            self._progress(f"cheapest available of {', '.join(self.gpu_choices)}: {gpu.id} "
                           f"(${gpu.price(self.cloud):.2f}/GPU-hour)")
            self.gpu = gpu.id
        else:
            gpu = resolve_gpu(self.gpu, self.client.gpu_types(), self.cloud)
        check_count(gpu, self.gpus_per_node, self.cloud)
        estimate = estimate_cost(gpu, self.gpus_per_node, self.nodes, self.expected_hours, self.cloud)
        if self.max_usd_per_hour is not None and estimate.per_hour > self.max_usd_per_hour:
            raise ConfigurationError(f"{estimate} is above max_usd_per_hour={self.max_usd_per_hour:g}: raise it, use "
                                     f"fewer GPUs, or give several types (gpu=[...]) to pick the cheapest available.")
        if self.budget_usd is not None:
            if estimate.total is not None and estimate.total > self.budget_usd:
                raise ConfigurationError(
                    f"The expected cost, {estimate}, is above budget_usd={self.budget_usd:g}: raise the budget, "
                    f"shorten the run or use fewer/cheaper GPUs.")
        if self.image is None:
            self._check_stock_image()
        self.estimate = estimate
        return estimate

    def _check_stock_image(self) -> None:
        """Choose the stock image from RunPod's catalog and build what the pods get installed: before any pod."""
        from gpu_proxy.clouds.runpod.node_install import install_plan
        from gpu_proxy.clouds.runpod.stock_images import choose_stock_image

        self._install = install_plan(self.requirements, self.pip_options)
        self.node_image = choose_stock_image(self._install.home.get("torch"), self.client.templates())
        self._progress(f"no image given: pods start from RunPod's {self.node_image} and get home's versions "
                       f"installed over SSH (pass image= for a faster start)")

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
        if self.state_dir:
            Path(self.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            self._folder = self.state_dir
        else:
            self._folder = tempfile.mkdtemp(prefix="gprp-")
        key = Path(self._folder, "id_ed25519")
        key.unlink(missing_ok=True)
        key.with_suffix(".pub").unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", str(key)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        self._key_file = str(key)
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
        """Install home's versions on every pod and start the node there (the node image's entrypoint does
        this itself). The node's environment is what the pod was created with (RunPod echoes it), with
        sshd left to the stock image."""
        from gpu_proxy.clouds.runpod.node_install import bootstrap_nodes

        targets, envs = [], []
        for pod in self._pods:
            target = self._ssh_target(pod)
            self._progress(f"waiting for SSH on {target.destination} (pod {pod.id})")
            wait_for_ssh(target, self.ssh_timeout_s, self._pod_failure)
            targets.append(target)
            env = {k: v for k, v in dict(pod.raw.get("env") or {}).items() if k != "PUBLIC_KEY"}
            if self.instant_cluster:
                # RunPod sets these in the container only (a stock image's ssh sessions get RUNPOD_* alone);
                # its API reports them, and the node's Instant Cluster rules read them (node/runpod_env.py).
                env.update(NODE_RANK=str(pod.cluster_rank), NODE_ADDR=pod.cluster_ip or "",
                           MASTER_ADDR=self._pods[0].cluster_ip or "", NUM_NODES=str(self.nodes))
            envs.append({**env, "SSHD": "off"})
        started = time.monotonic()
        self._bootstrapped = bootstrap_nodes(targets, envs, self._install, self._progress, self._node_log)
        self.bootstrap_s = time.monotonic() - started

    def _bring_up_ray(self) -> None:
        """Token to every pod over SSH, the dashboard tunnel, then every node and GPU joined."""
        self._token = generate_token()
        for pod in self._pods:
            target = self._ssh_target(pod)
            self._progress(f"waiting for SSH on {target.destination} (pod {pod.id})")
            wait_for_ssh(target, self.ssh_timeout_s, self._pod_failure,
                         hint="Is the image built from cluster_image/Dockerfile (it starts sshd from PUBLIC_KEY)?")
            deliver_token([target], self._token_file, self._token)
        self._progress("Ray token delivered over SSH; waiting for the Ray head")
        tunnel = open_dashboard_tunnel(self._ssh_target(self._pods[0]),
                                       self.ray_ports.dashboard or DEFAULT_DASHBOARD_PORT, self.ray_timeout_s,
                                       self._pod_failure, self._tunnel_box.append)
        wanted = float(self.gpus_per_node * self.nodes)
        wait_for_nodes_and_gpus(f"http://{tunnel.local_address}", self._token, self.nodes, wanted,
                                self.ray_timeout_s, self._pod_failure,
                                gpus_seen=lambda: self.resources().get("GPU", 0.0))
        self._progress(f"all {self.nodes} node(s) and {wanted:g} GPU(s) joined")
        self._watch()
        self._progress(f"Ray is up on {self.nodes} pod(s); dashboard tunnelled to http://{tunnel.local_address} "
                       f"(${self.cost_per_hour():.2f}/hour while up)")

    def _ssh_target(self, pod: Pod) -> SSHTarget:
        direct = pod.ssh_direct
        # A new pod has a new host key: record it on first contact in this cluster's own known_hosts.
        return SSHTarget(direct.host, user=direct.username, port=direct.port, identity_file=self._key_file,
                         known_hosts_file=str(Path(self._folder, "known_hosts")), host_key_policy="accept-new")

    def _pod_failure(self) -> str | None:
        for pod_id, pod in self._query().items():
            if pod is None or pod.status != "RUNNING":
                member = f" of Instant Cluster {self.cluster_id}" if self.cluster_id else ""
                return f"RunPod pod {pod_id}{member} is {pod.status if pod else 'gone'}: its container stopped."
        # A stock image's pod outlives the node started in it (its sshd keeps it up): ask the node too.
        return next((why for node in self._bootstrapped if (why := node.failure())), None)

    # -- while up: cost meter, budget, home heartbeat ---------------------------------------------------------

    def _watch(self, spent_usd: float = 0.0) -> None:
        """Start the cost meter and (with ``idle_timeout``) the home heartbeat."""
        self._meter = CostMeter(self, self._pods_rate, interval_s=self.meter_interval_s, spent_usd=spent_usd,
                                budget_usd=self.budget_usd, grace_s=self.budget_grace_s,
                                checkpoint_margin_s=self.checkpoint_margin_s, end=self._end_for_budget,
                                progress=self._progress).start()
        if self.idle_timeout_s is not None:
            from gpu_proxy.runs.heartbeat import HomeHeartbeat

            # While this process holds the cluster, the head's idle watcher sees home (gpu_proxy/runs/heartbeat.py).
            self._heartbeat = HomeHeartbeat(Endpoint(f"http://{self._tunnel_box[0].local_address}", self._token),
                                            f"cluster-{self.name}").start()

    def _end_for_budget(self) -> None:
        self.budget_exceeded = True
        failures = self._end(from_meter=True)
        if failures:
            self._progress("could not terminate: " + "; ".join(failures))

    def _unwatch(self, from_meter: bool = False) -> None:
        if self._heartbeat is not None:
            self._heartbeat.close()
            self._heartbeat = None
        if self._meter is not None and not from_meter:
            self._meter.close()

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

    def detach(self) -> None:
        """Leave the pods running (``gpu-proxy up``): close the tunnel, stop metering, keep the key folder."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._unwatch()
        for tunnel in self._tunnel_box:
            tunnel.close()
        self._tunnel_box.clear()
        self._launch = None
        self._pods = []
        self._token = None

    def _end(self, from_meter: bool = False) -> list[str]:
        self._unwatch(from_meter)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        failures = []
        if self._pod_ids or self._tunnel_box or self._cluster_ids:
            failures = _teardown(self._launch, self._tunnel_box, self._folder)
        elif self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._token = None
        self._pods = []
        return failures
