"""A Ray cluster on RunPod pods, reached through an SSH tunnel: :class:`RunPodCluster`.

``start()``:

1. checks everything that can be checked for free: the arguments, the API key, the GPU name
   against RunPod's catalog (close names when it is unknown), the GPU count against the largest
   machine, the estimated cost against ``budget_usd``;
2. makes a fresh SSH key pair for this cluster; its public half goes to the pod as ``PUBLIC_KEY``
   (the only thing in the pod's environment besides Ray's settings: RunPod echoes a pod's
   environment back in its API, so no secret may go there);
3. creates the pod from the node image (``cluster_image/``), exposing only ``22/tcp``, and waits,
   saying what it waits for: pod RUNNING, SSH answering, Ray head up, all GPUs present;
4. generates the Ray token here and copies it to the pod over SSH as a 0600 file (the node's
   entrypoint waits for it before starting Ray), then tunnels a local port to the dashboard, which
   listens on the pod's loopback only.

``stop()`` terminates every pod this object created. A launch that fails at any step terminates
what it created before the error reaches the caller; so does the end of this Python process
unless ``keep=True``.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Sequence

from gpu_proxy.clouds.runpod.catalog import CLOUDS, CostEstimate, check_count, estimate_cost, resolve_gpu
from gpu_proxy.clouds.runpod.client import CreatePodRequest, Pod, RunPodClient
from gpu_proxy.clouds.runpod.provision import (LaunchError, query_instances, run_instances, terminate_instances,
                                               wait_instances)
from gpu_proxy.clusters.base import Cluster, Endpoint
from gpu_proxy.clusters.ray_node import DEFAULT_DASHBOARD_PORT, RayNodeError, RayPorts, generate_token, wait_for_nodes
from gpu_proxy.errors import ConfigurationError, GpuProxyError
from gpu_proxy.ssh import SSHError, SSHTarget, SSHTunnel, put_file, run_remote

log = logging.getLogger(__name__)

IMAGE_ENV = "GPU_PROXY_RUNPOD_IMAGE"


def _print_progress(message: str) -> None:
    print(f"gpu-proxy runpod: {message}", file=sys.stderr, flush=True)


def _teardown(client: RunPodClient, pod_ids: list[str], tunnel_box: list, folder: str | None) -> list[str]:
    """Close the tunnel, terminate the pods, delete the key folder. Never references the cluster
    (it also runs as a finalizer at interpreter exit)."""
    for tunnel in tunnel_box:
        tunnel.close()
    tunnel_box.clear()
    failures = terminate_instances(client, list(pod_ids))
    failed = {failure.split(":")[0] for failure in failures}
    pod_ids[:] = [pod_id for pod_id in pod_ids if pod_id in failed]
    if folder and not pod_ids:
        shutil.rmtree(folder, ignore_errors=True)
    return failures


class RunPodCluster(Cluster):
    """Ray on RunPod GPU pods, launched by this object and torn down by it.

    Args:
        gpu: a RunPod GPU type: its id (``"NVIDIA H100 80GB HBM3"``), display name (``"H100 SXM"``) or
            an unambiguous part of either.
        gpus_per_node: GPUs per pod (one machine).
        nodes: pods. Only 1 today (see docs/runpod.md, "Several nodes").
        idle_timeout: not implemented yet; must stay None (see docs/runpod.md).
        budget_usd: the most this cluster may cost. Refused before launch when the expected run
            (``expected_hours``) would pass it; while up, the pods are terminated when the metered
            spend reaches it (home meters it, so it holds only while this process lives).
        keep: leave the pods running when this Python process ends without ``stop()``.
        image: the node image built from ``cluster_image/Dockerfile``; default ``$GPU_PROXY_RUNPOD_IMAGE``.
        cloud: ``"SECURE"`` (RunPod's data centres) or ``"COMMUNITY"``.
        data_centers: preferred data centre ids; empty lets RunPod choose.
        disk_gb: container disk per pod.
        expected_hours: for the cost estimate shown before launch.
        api_key, base_url: see :class:`RunPodClient` (default ``$RUNPOD_API_KEY``, ``$RUNPOD_REST_URL``).
        ray_ports: Ray's ports on the pod (default Ray's own).
        launch_timeout_s, ssh_timeout_s, ray_timeout_s: how long each stage may take.
        progress: called with each progress line; default prints to stderr.
    """

    owns_nodes = True

    def __init__(self, gpu: str, gpus_per_node: int = 1, nodes: int = 1, *, idle_timeout: "str | float | None" = None,
                 budget_usd: float | None = None, keep: bool = False, image: str | None = None,
                 cloud: str = "SECURE", data_centers: Sequence[str] = (), disk_gb: int = 50,
                 expected_hours: float | None = None, api_key: str | None = None, base_url: str | None = None,
                 ray_ports: RayPorts | None = None, launch_timeout_s: float = 900.0, ssh_timeout_s: float = 300.0,
                 ray_timeout_s: float = 300.0, meter_interval_s: float = 30.0,
                 progress: Callable[[str], None] | None = None) -> None:
        import os

        if not isinstance(gpu, str) or not gpu.strip():
            raise ConfigurationError(f"gpu={gpu!r}: give a RunPod GPU type, e.g. 'NVIDIA H100 80GB HBM3'.")
        if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
            raise ConfigurationError(f"gpus_per_node={gpus_per_node!r} must be a whole number >= 1.")
        if not isinstance(nodes, int) or nodes < 1:
            raise ConfigurationError(f"nodes={nodes!r} must be a whole number >= 1.")
        if nodes > 1:
            raise ConfigurationError(
                f"nodes={nodes}: several RunPod nodes are not supported yet (the node image cannot yet learn its "
                f"global-networking address; see docs/runpod.md). Use one pod with up to 8 GPUs (gpus_per_node=8).")
        if idle_timeout is not None:
            raise ConfigurationError(
                "idle_timeout is not implemented yet for RunPod: it needs the pods to stop themselves, without "
                "your API key on them. Until then pods are terminated by stop(), by the end of this process "
                "(unless keep=True), and by budget_usd.")
        if budget_usd is not None and (not isinstance(budget_usd, (int, float)) or budget_usd <= 0):
            raise ConfigurationError(f"budget_usd={budget_usd!r} must be a positive number of US dollars.")
        if cloud not in CLOUDS:
            raise ConfigurationError(f"cloud={cloud!r}: use 'SECURE' or 'COMMUNITY'.")
        if isinstance(data_centers, str):
            raise ConfigurationError(f"data_centers={data_centers!r}: pass a list, e.g. ['US-TX-3'].")
        image = image or os.environ.get(IMAGE_ENV)
        if not image:
            raise ConfigurationError(
                f"No node image: build cluster_image/Dockerfile, push it to a registry RunPod can pull from, and "
                f"pass image='registry/name:tag' or set {IMAGE_ENV} (see docs/runpod.md).")
        self.gpu = gpu.strip()
        self.gpus_per_node = gpus_per_node
        self.nodes = nodes
        self.budget_usd = budget_usd
        self.keep = keep
        self.image = image
        self.cloud = cloud
        self.data_centers = tuple(data_centers)
        self.disk_gb = disk_gb
        self.expected_hours = expected_hours
        self.ray_ports = ray_ports or RayPorts()
        self.launch_timeout_s = launch_timeout_s
        self.ssh_timeout_s = ssh_timeout_s
        self.ray_timeout_s = ray_timeout_s
        self.meter_interval_s = meter_interval_s
        self._progress = progress or _print_progress
        self._api_key = api_key
        self._base_url = base_url
        self._client: RunPodClient | None = None
        self.name = f"gpu-proxy-{secrets.token_hex(4)}"
        self.estimate: CostEstimate | None = None
        self.budget_exceeded = False
        self._pod_ids: list[str] = []
        self._pods: list[Pod] = []
        self._tunnel_box: list[SSHTunnel] = []
        self._token: str | None = None
        self._folder: str | None = None
        self._key_file: str | None = None
        self._token_file = ""
        self._launched_at: float | None = None
        self._finalizer: weakref.finalize | None = None
        self._meter_stop = threading.Event()
        self._meter: threading.Thread | None = None

    def __repr__(self) -> str:  # no key, no token
        return (f"RunPodCluster(gpu={self.gpu!r}, gpus_per_node={self.gpus_per_node}, nodes={self.nodes}, "
                f"pods={self._pod_ids})")

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
    def pod_ids(self) -> list[str]:
        return list(self._pod_ids)

    @property
    def started(self) -> bool:
        return self._token is not None and bool(self._tunnel_box) and self._tunnel_box[0].is_open

    @property
    def head(self) -> SSHTarget:
        if not self._pods:
            raise GpuProxyError(f"{self!r} has no pod yet: call start().")
        return self._ssh_target(self._pods[0])

    def cost_per_hour(self) -> float:
        """What the pods cost per hour, as RunPod reports them (the catalog estimate before launch)."""
        if self._pods:
            return sum(pod.cost_per_hour for pod in self._pods)
        return self.estimate.per_hour if self.estimate else 0.0

    def spent_usd(self) -> float:
        """Metered spend since the first pod was created (billing is per second)."""
        if self._launched_at is None:
            return 0.0
        return self.cost_per_hour() * (time.monotonic() - self._launched_at) / 3600

    # -- start ----------------------------------------------------------------------------------------------

    def check(self) -> CostEstimate:
        """Everything checkable before money is spent: key, GPU name, count, budget. Returns the estimate."""
        gpu = resolve_gpu(self.gpu, self.client.gpu_types(), self.cloud)
        check_count(gpu, self.gpus_per_node, self.cloud)
        estimate = estimate_cost(gpu, self.gpus_per_node, self.nodes, self.expected_hours, self.cloud)
        if self.budget_usd is not None:
            if estimate.total is not None and estimate.total > self.budget_usd:
                raise ConfigurationError(
                    f"The expected cost, {estimate}, is above budget_usd={self.budget_usd:g}: raise the budget, "
                    f"shorten the run or use fewer/cheaper GPUs.")
        self.estimate = estimate
        return estimate

    def start(self) -> None:
        if self.started:
            return
        if self._pod_ids:
            raise GpuProxyError(f"{self!r} was started and then lost its tunnel; stop() it and make a new one.")
        try:
            self._start()
        except BaseException:
            failures = self._end()
            if failures:
                self._progress("could not terminate every pod; terminate them in the RunPod console: "
                               + "; ".join(failures))
            raise

    def _start(self) -> None:
        estimate = self.check()
        self._progress(f"estimated cost: {estimate}")
        gpu_id = estimate.gpu
        self._folder = tempfile.mkdtemp(prefix="gprp-")
        key = Path(self._folder, "id_ed25519")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.name, "-f", str(key)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        self._key_file = str(key)
        suffix = self.name.rsplit("-", 1)[-1]
        self._token_file = f"/tmp/gp-{suffix}/token"  # on the pod; short: Ray's socket paths are length-limited
        env = {"ROLE": "head", "PUBLIC_KEY": key.with_suffix(".pub").read_text().strip(), "SSHD": "on",
               "RAY_TOKEN_FILE": self._token_file, "RAY_TEMP_DIR": f"/tmp/gp-{suffix}/r",
               "RAY_TOKEN_WAIT_S": str(int(self.launch_timeout_s + self.ssh_timeout_s + 60))}
        for field_name, variable in RayPorts.environment_names().items():
            value = getattr(self.ray_ports, field_name)
            if value is not None:
                env[variable] = str(value)
        request = CreatePodRequest(name=f"{self.name}-head", image=self.image, gpu_id=gpu_id,
                                   gpu_count=self.gpus_per_node, env=env, ports=("22/tcp",), disk_gb=self.disk_gb,
                                   cloud=self.cloud, data_center_ids=self.data_centers)
        client = self.client
        if not self.keep:  # pods must not outlive this process by accident
            self._finalizer = weakref.finalize(self, _teardown, client, self._pod_ids, self._tunnel_box, self._folder)
        self._progress(f"creating pod {request.name}: {self.gpus_per_node} x {gpu_id} ({self.cloud.lower()} cloud)")
        run_instances(client, [request], self._created)
        self._pods = wait_instances(client, self._pod_ids, self.launch_timeout_s, self._progress)
        target = self._ssh_target(self._pods[0])
        self._progress(f"waiting for SSH on {target.destination}")
        self._wait_for_ssh(target)
        self._token = generate_token()
        put_file(target, self._token_file, self._token)
        self._progress("Ray token delivered over SSH; waiting for the Ray head")
        tunnel = SSHTunnel(target, self.ray_ports.dashboard or DEFAULT_DASHBOARD_PORT,
                           ready_timeout_s=self.ray_timeout_s)
        self._tunnel_box.append(tunnel)
        try:
            tunnel.open()  # returns once the dashboard answers on the pod
        except SSHError as error:
            raise LaunchError(f"The Ray head did not come up on the pod: {self._pod_failure() or error}") from None
        self._wait_for_ray()
        self._progress(f"Ray is up on {self.nodes} pod(s); dashboard tunnelled to http://{tunnel.local_address} "
                       f"(${self.cost_per_hour():.2f}/hour while up)")
        if self.budget_usd is not None:
            self._meter = threading.Thread(target=self._watch_budget, name=f"{self.name}-budget", daemon=True)
            self._meter.start()

    def _created(self, pod: Pod) -> None:
        self._pod_ids.append(pod.id)
        if self._launched_at is None:
            self._launched_at = time.monotonic()
        self._progress(f"pod {pod.id} created ({pod.status}, ${pod.cost_per_hour:.2f}/hour)")

    def _ssh_target(self, pod: Pod) -> SSHTarget:
        direct = pod.ssh_direct
        # A new pod has a new host key: record it on first contact in this cluster's own known_hosts.
        return SSHTarget(direct.host, user=direct.username, port=direct.port, identity_file=self._key_file,
                         known_hosts_file=str(Path(self._folder, "known_hosts")), host_key_policy="accept-new")

    def _pod_failure(self) -> str | None:
        for pod_id, pod in query_instances(self.client, self._pod_ids).items():
            if pod is None or pod.status != "RUNNING":
                return f"RunPod pod {pod_id} is {pod.status if pod else 'gone'}: its container stopped."
        return None

    def _wait_for_ssh(self, target: SSHTarget) -> None:
        deadline = time.monotonic() + self.ssh_timeout_s
        while True:
            try:
                run_remote(target, "true", timeout_s=30)
                return
            except SSHError as error:
                last = str(error)
            failure = self._pod_failure()
            if failure:
                raise LaunchError(failure)
            if time.monotonic() > deadline:
                raise LaunchError(f"The pod's sshd did not answer within {self.ssh_timeout_s:.0f} s: {last}\n"
                                  f"Is the image built from cluster_image/Dockerfile (it starts sshd from PUBLIC_KEY)?")
            time.sleep(1.0)

    def _wait_for_ray(self) -> None:
        url = f"http://{self._tunnel_box[0].local_address}"
        checks = iter(range(10**9))
        failure = lambda: self._pod_failure() if next(checks) % 10 == 9 else None  # noqa: E731
        try:
            wait_for_nodes(url, self._token, self.nodes, timeout_s=self.ray_timeout_s, failure=failure)
        except RayNodeError as error:
            raise LaunchError(f"Ray did not come up on the pod: {error}") from None
        wanted = float(self.gpus_per_node * self.nodes)
        deadline = time.monotonic() + self.ray_timeout_s
        while (found := self.resources().get("GPU", 0.0)) < wanted:
            if time.monotonic() > deadline:
                raise LaunchError(f"Ray sees {found:g} of the {wanted:g} GPUs rented after {self.ray_timeout_s:.0f} s: "
                                  f"the image's CUDA may not match the host's driver.")
            time.sleep(1.0)
        self._progress(f"all {self.nodes} node(s) and {wanted:g} GPU(s) joined")

    def _watch_budget(self) -> None:
        while not self._meter_stop.wait(self.meter_interval_s):
            spent = self.spent_usd()
            if spent >= self.budget_usd:
                self.budget_exceeded = True
                self._progress(f"budget reached: ${spent:.2f} of budget_usd={self.budget_usd:g}; terminating the pods")
                failures = self._end(from_meter=True)
                if failures:
                    self._progress("could not terminate: " + "; ".join(failures))
                return

    # -- the Cluster interface ------------------------------------------------------------------------------

    def endpoint(self) -> Endpoint:
        if self.budget_exceeded:
            raise GpuProxyError(f"{self!r} was torn down: it reached budget_usd={self.budget_usd:g}.")
        if not self.started:
            raise GpuProxyError(f"{self!r} is not started: call start() (or use it in a with block) first.")
        return Endpoint(f"http://{self._tunnel_box[0].local_address}", self._token)

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

    def _end(self, from_meter: bool = False) -> list[str]:
        if not from_meter:
            self._meter_stop.set()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        failures = []
        if self._pod_ids or self._tunnel_box:
            ids = list(self._pod_ids)
            failures = _teardown(self.client, self._pod_ids, self._tunnel_box, self._folder)
            if ids:
                self._progress(f"terminated pod(s) {', '.join(i for i in ids if i not in self._pod_ids)}")
        elif self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._token = None
        self._pods = []
        return failures
