"""A fake RunPod REST v2 server on 127.0.0.1 for the tests.

Every request and every response is checked against RunPod's OpenAPI document
(``runpod-openapi-v2.json`` beside this file, a copy of ``shared/runpod/openapi-v2.json``). A request
that breaks the contract is answered as RunPod answers it (422 for a body, 400 for a parameter) and
recorded in :attr:`FakeRunPod.violations`; a response of ours that breaks it is recorded there too,
so a test asserting ``fake.violations == []`` checks both the client and the fake.

What it models:

* pods go PROVISIONING -> STARTING -> RUNNING, and EXITED (stopped, or their process ended), ERROR (the
  runtime could not start them) or gone (terminated: 404 afterwards, as RunPod deletes them); the
  ``actions`` each status allows; ``cost`` per hour while not EXITED; ``env`` echoed back as RunPod does;
* a catalog (GPU types, prices, per-cloud max counts) and data centres with stock per GPU type, so a
  create can fail for capacity (400, RunPod's wording) and availability can be read;
* Instant Clusters (``/v2/clusters``): a create makes ``podCount`` pods in one data centre (stock
  for all of them, or RunPod's 400), ranked once they start, each with the environment RunPod sets in
  a cluster (``MASTER_ADDR``/``PRIMARY_ADDR``, ``MASTER_PORT``, ``NODE_ADDR``, ``NODE_RANK``,
  ``NUM_NODES``, ``NUM_TRAINERS``, ``HOST_NODE_ADDR``, ``WORLD_SIZE``; not echoed in the pod's ``env``,
  like ``RUNPOD_POD_ID``); members are hidden from ``GET /v2/pods`` unless ``includeClusterPods=true``
  and refused (409) by the pod endpoints that change them; deleting the cluster terminates them;
* billing (``/v2/billing/pods``, ``/v2/billing/clusters``): every pod bills ``cost`` per second from
  creation until it stops or is terminated (segments recorded as the price or status changes); a
  cluster's members bill as the cluster, not as pods; records per resource per bucket, RunPod's
  window snapping, ``lastN``; :meth:`FakeRunPod.billed_usd` is the fake's own ledger for the tests;
* a wrong API key (401), and injected failures (429 with ``Retry-After``, 5xx, slow answers);
* RunPod's pod-scoped API key: each pod's container gets its own ``RUNPOD_API_KEY``, which the
  fake accepts for that pod's ``/v2/pods/{id}`` and ``/v2/pods/{id}/action`` only (403 elsewhere,
  401 for any other pod), as RunPod documents it; ``terminated_by`` records who ended each pod. A
  cluster member's key may also delete its own cluster (an ASSUMPTION: RunPod documents pod-scoped
  keys for pods only; see docs/runpod.md); ``cluster_deleted_by`` records who deleted each cluster.

Test seams that RunPod itself never sets (documented in gpu_proxy/clouds/runpod/node/__init__.py):
``RUNPOD_REST_URL`` (the fake's address, so a pod's idle watcher reaches the fake) and, for pods
with global networking or in an Instant Cluster, ``GPU_PROXY_TEST_INTERNAL_IP``
(``<podId>.runpod.internal`` and the cluster's overlay addresses stand for this machine's own
address, because every fake pod is a process on this one machine).

Pods are pluggable: a :class:`PodRuntime` is called when a pod starts, stops and is terminated.
:class:`NullRuntime` runs nothing (client tests); :class:`EntrypointRuntime` starts the real
``cluster_image/entrypoint.sh`` as a local process with sshd on a free loopback port, and the pod's
``ssh.direct`` and ``runtime.ports`` report that port, as RunPod reports the published 22/tcp.
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping, Protocol
from urllib.parse import parse_qs, urlsplit

from tests.fakes.openapi_contract import Contract, Operation

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "cluster_image" / "entrypoint.sh"
NO_CAPACITY = ("There are no longer any instances available with the requested specifications. "
               "Please refresh and try again.")

_contract: Contract | None = None


def contract() -> Contract:
    global _contract
    if _contract is None:  # parsing the document and compiling validators takes a moment: once per process
        _contract = Contract()
    return _contract


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- catalog ----------------------------------------------------------------------------------------------

def default_templates() -> list[dict[str, Any]]:
    """RunPod's official pod templates with stock PyTorch images (shaped as the OpenAPI example), and a
    serverless one that a pod must not be started from."""
    def template(template_id: str, name: str, image: str, serverless: bool = False) -> dict[str, Any]:
        return {"id": template_id, "name": name, "image": image, "args": "", "disk": 50, "mounts": {},
                "ports": ["8888/http", "22/tcp"], "env": {}, "registry": None, "serverless": serverless,
                "public": True, "category": "NVIDIA", "startSsh": True, "startJupyter": not serverless,
                "allowedCudaVersions": []}
    return [template("30zmvf89kd", "PyTorch 2.8", "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404"),
            template("runpod-torch-v21", "PyTorch 2.1", "runpod/pytorch:2.1.0-py3.10-cuda11.8.0-devel-ubuntu22.04"),
            template("rp-worker-vllm", "vLLM worker", "runpod/worker-v1-vllm:v2.7.0", serverless=True)]


@dataclass
class FakeGpu:
    id: str
    name: str
    memory: int
    price_secure: float
    price_community: float
    max_secure: int = 8
    max_community: int = 4
    community: bool = True


@dataclass
class FakeDataCenter:
    id: str
    name: str
    region: str = "NORTH_AMERICA"
    global_network: bool = True
    stock: dict[str, int] = field(default_factory=dict)  # GPU type id -> free GPUs on its largest machine


def default_catalog() -> tuple[list[FakeGpu], list[FakeDataCenter]]:
    gpus = [
        FakeGpu("NVIDIA H100 80GB HBM3", "H100 SXM", 80, 2.69, 2.39),
        FakeGpu("NVIDIA H100 PCIe", "H100 PCIe", 80, 2.39, 1.99),
        FakeGpu("NVIDIA A100 80GB PCIe", "A100 PCIe", 80, 1.64, 1.19),
        FakeGpu("NVIDIA GeForce RTX 4090", "RTX 4090", 24, 0.69, 0.34, max_secure=8, max_community=4),
        FakeGpu("NVIDIA RTX A4000", "RTX A4000", 16, 0.25, 0.17, max_secure=8, max_community=6),
        FakeGpu("NVIDIA L40S", "L40S", 48, 0.86, 0.79, community=False),
    ]
    centres = [
        FakeDataCenter("US-TX-3", "US Texas 3", stock={"NVIDIA H100 80GB HBM3": 8, "NVIDIA RTX A4000": 8,
                                                       "NVIDIA GeForce RTX 4090": 2}),
        FakeDataCenter("EU-RO-1", "EU Romania 1", region="EUROPE",
                       stock={"NVIDIA A100 80GB PCIe": 4, "NVIDIA RTX A4000": 4, "NVIDIA L40S": 2}),
        FakeDataCenter("CA-MTL-1", "CA Montreal 1", global_network=False, stock={"NVIDIA H100 PCIe": 1}),
    ]
    return gpus, centres


def _level(free: int, count: int) -> str:
    if free < count:
        return "NONE"
    return "LOW" if free < 2 * count else "MEDIUM" if free < 4 * count else "HIGH"


# ---- pods and their runtimes ---------------------------------------------------------------------------

@dataclass
class FakePod:
    id: str
    name: str
    image: str
    gpu_id: str
    gpu_count: int
    env: dict[str, str]
    ports: list[str]
    disk: int
    cloud: str
    data_center: str
    price: float  # per hour, all GPUs
    global_networking: bool
    status: str = "PROVISIONING"
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    started_monotonic: float | None = None
    public_ip: str | None = None
    ssh_port: int | None = None
    error: str | None = None
    rest_url: str = ""
    scoped_key: str = field(default_factory=lambda: "rpa_pod_" + secrets.token_hex(16), repr=False)
    cluster_id: str | None = None  # Instant Cluster membership
    cluster_rank: int | None = None  # assigned when the pod starts (null before, as RunPod documents)
    cluster_ip: str | None = None
    cluster_env: dict[str, str] = field(default_factory=dict, repr=False)  # what RunPod sets in a cluster member
    # Billing ledger: [start, end or None, USD/hour] (wall-clock seconds); kept up to date by __setattr__.
    segments: list[list] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._rebill()

    def __setattr__(self, name: str, value: Any) -> None:
        tracked = name in ("price", "status") and "segments" in self.__dict__
        object.__setattr__(self, name, value)
        if tracked:
            self._rebill()

    def billing_rate(self) -> float:
        return 0.0 if self.status in ("EXITED", "ERROR", "TERMINATED") else self.price

    def _rebill(self) -> None:
        now, rate = time.time(), self.billing_rate()
        open_segment = self.segments[-1] if self.segments and self.segments[-1][1] is None else None
        if open_segment is not None:
            if open_segment[2] == rate:
                return
            open_segment[1] = now
        if rate > 0:
            self.segments.append([now, None, rate])

    def billed(self, start: float = 0.0, end: float | None = None) -> float:
        """USD this pod cost in [start, end) (end: now)."""
        end = time.time() if end is None else end
        return sum(rate * max(0.0, min(t1 if t1 is not None else end, end) - max(t0, start)) / 3600
                   for t0, t1, rate in self.segments)

    ACTIONS = {"PROVISIONING": ["stop", "terminate"], "STARTING": ["stop", "terminate"],
               "RUNNING": ["stop", "restart", "terminate"], "EXITED": ["start", "terminate"],
               "ERROR": ["start", "terminate"]}

    @property
    def internal_dns(self) -> str:
        return f"{self.id}.runpod.internal"

    def to_json(self) -> dict[str, Any]:
        running = self.status == "RUNNING"
        direct = None
        if running and self.ssh_port and "22/tcp" in self.ports:
            direct = {"host": self.public_ip, "port": self.ssh_port, "username": "root",
                      "command": f"ssh root@{self.public_ip} -p {self.ssh_port}"}
        proxy_user = f"{self.id}-{self.id[:8]}"
        proxy = (None if self.status == "PROVISIONING" else
                 {"host": "ssh.runpod.io", "port": 22, "username": proxy_user,
                  "command": f"ssh {proxy_user}@ssh.runpod.io"})
        runtime = None
        if running:
            uptime = int(time.monotonic() - (self.started_monotonic or time.monotonic()))
            runtime = {"uptime": uptime, "gpus": [{"util": 0, "memoryUtil": 0}] * self.gpu_count,
                       "cpu": {"util": 1}, "memory": {"util": 1},
                       "ports": [{"private": 22, "public": self.ssh_port, "type": "tcp", "ip": self.public_ip}]}
        networking: dict[str, Any] = {"enabled": self.global_networking}
        member: dict[str, Any] | None = None
        if self.cluster_id is not None:
            member = {"id": self.cluster_id, "rank": self.cluster_rank}
            if self.cluster_rank is not None and self.cluster_ip:
                member["ip"] = self.cluster_ip
        if self.global_networking:
            networking.update(ip="10.65.0." + str(1 + int(self.id[-4:], 36) % 250), internalDns=self.internal_dns)
        return {
            "id": self.id, "name": self.name, "status": self.status, "actions": self.ACTIONS.get(self.status, []),
            "image": self.image, "args": "", "disk": self.disk, "mounts": {}, "ports": list(self.ports),
            "env": dict(self.env), "registry": None, "gpu": {"id": self.gpu_id, "count": self.gpu_count},
            "cloud": self.cloud, "dataCenterId": self.data_center, "cudaVersion": "12.8",
            "ssh": {"proxy": proxy, "direct": direct}, "template": None,
            "cost": 0.0 if self.status in ("EXITED", "ERROR") else self.price, "locked": False,
            "globalNetworking": networking, "runtime": runtime, "createdAt": self.created_at,
            "startedAt": self.started_at, **({"cluster": member} if member else {}),
        }


@dataclass
class FakeCluster:
    id: str
    name: str
    type: str
    gpu_id: str
    gpus_per_pod: int
    pod_count: int
    data_center: str
    subnet: int  # the overlay network is 10.65.<subnet>.0/24
    pod_ids: list[str] = field(default_factory=list)  # in rank order
    created_at: str = field(default_factory=_now)

    def address(self, rank: int) -> str:
        return f"10.65.{self.subnet}.{rank + 2}"

    def to_json(self, pods: Mapping[str, "FakePod"]) -> dict[str, Any]:
        members = [pods[pod_id] for pod_id in self.pod_ids if pod_id in pods]
        by_status: dict[str, int] = {}
        for pod in members:
            by_status[pod.status] = by_status.get(pod.status, 0) + 1
        answer: dict[str, Any] = {
            "id": self.id, "name": self.name, "type": self.type,
            "compute": {"gpuTypeId": self.gpu_id, "gpuCountPerPod": self.gpus_per_pod, "podCount": self.pod_count},
            "dataCenterId": self.data_center, "pods": {"total": len(members), "byStatus": by_status},
            "network": {"cidr": f"10.65.{self.subnet}.0/24", "vxlanId": 100 + self.subnet, "vxlanPort": 4789},
            "createdAt": self.created_at}
        primary = next((pod for pod in members if pod.cluster_rank == 0), None)
        if primary is not None:
            answer["primary"] = {"podId": primary.id, "status": primary.status}
            if primary.status == "RUNNING" and primary.ssh_port:
                answer["primary"]["sshEndpoint"] = f"{primary.public_ip}:{primary.ssh_port}"
        return answer


class PodRuntime(Protocol):
    """What runs a fake pod's container."""

    def start(self, pod: FakePod) -> tuple[str, int]:
        """Start the pod's container; return (public IP, published port of 22/tcp). Raise to fail the pod."""

    def alive(self, pod: FakePod) -> bool:
        """Whether the container still runs (an exited one makes the pod EXITED)."""

    def stop(self, pod: FakePod) -> None:
        """Stop the container (the pod stops or is terminated). Must be idempotent."""


class NullRuntime:
    """Pods whose container is nothing: for client tests."""

    def start(self, pod: FakePod) -> tuple[str, int]:
        return "127.0.0.1", 20000 + random.randrange(20000)

    def alive(self, pod: FakePod) -> bool:
        return True

    def stop(self, pod: FakePod) -> None:
        pass


def machine_address() -> str | None:
    """This machine's non-loopback IPv4 address (where fake pods with global networking meet), if any."""
    import socket

    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            if not info[4][0].startswith("127."):
                return info[4][0]
    except OSError:
        pass
    try:
        output = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return next((item for item in output if "." in item and not item.startswith("127.")), None)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EntrypointRuntime:
    """Each pod is a local process running the real node entrypoint (``cluster_image/entrypoint.sh``).

    The pod's env from the create request is passed through, plus what a RunPod machine adds or what
    running on one shared machine needs: sshd on a free 127.0.0.1 port with its own host keys and
    authorized_keys file (never root's own), ``RUNPOD_POD_ID``/``RUNPOD_PUBLIC_IP``/
    ``RUNPOD_TCP_PORT_22``, and ``NUM_GPUS`` = the pod's GPU count (Ray then advertises the GPUs the
    pod rents; this machine has none) and ``NUM_CPUS`` (default 1) unless the request set them.
    """

    def __init__(self, num_cpus: int = 1, python: str = sys.executable,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.num_cpus = num_cpus
        self.extra_env = dict(extra_env or {})  # e.g. a broken setting, to make pods fail
        self.python = python
        self.folder = Path(tempfile.mkdtemp(prefix="gpfr-", dir="/tmp"))
        self._processes: dict[str, subprocess.Popen] = {}
        self._ssh_ports: dict[str, int] = {}
        self._lock = threading.Lock()

    def pod_log(self, pod_id: str) -> str:
        path = self.folder / pod_id / "pod.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, pod: FakePod) -> tuple[str, int]:
        folder = self.folder / pod.id
        folder.mkdir(mode=0o700)
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "ROLE", "RUNPOD_"))}
        env.update(GPU_PROXY_PYTHON=self.python, RAY_USAGE_STATS_ENABLED="0", NUM_GPUS=str(pod.gpu_count),
                   NUM_CPUS=str(self.num_cpus))
        env.update(pod.env)
        env.update(pod.cluster_env)  # RunPod's Instant Cluster variables win over the request's env
        env.update(SSHD_PORT=str(port), SSHD_LISTEN_ADDRESS="127.0.0.1", SSHD_DIR=str(folder / "ssh"),
                   SSH_AUTHORIZED_KEYS=str(folder / "authorized_keys"), SSHD_STRICT_MODES="no",
                   RUNPOD_POD_ID=pod.id, RUNPOD_PUBLIC_IP="127.0.0.1", RUNPOD_TCP_PORT_22=str(port),
                   RUNPOD_GPU_COUNT=str(pod.gpu_count), RUNPOD_API_KEY=pod.scoped_key, RUNPOD_REST_URL=pod.rest_url)
        if pod.global_networking or pod.cluster_id is not None:
            address = machine_address()
            if address is None:
                raise RuntimeError("this machine has no non-loopback address for fake global networking")
            env.update(GPU_PROXY_TEST_INTERNAL_IP=address)
        env.update(self.extra_env)
        with open(folder / "pod.log", "w") as log:
            process = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        with self._lock:
            self._processes[pod.id] = process
            self._ssh_ports[pod.id] = port
        threading.Thread(target=_container_ends_with_its_main_process, args=(pod.id, port, process), daemon=True,
                         name=f"container-{pod.id}").start()
        return "127.0.0.1", port

    def alive(self, pod: FakePod) -> bool:
        process = self._processes.get(pod.id)
        return process is not None and process.poll() is None

    def stop(self, pod: FakePod) -> None:
        with self._lock:
            process = self._processes.pop(pod.id, None)
            port = self._ssh_ports.pop(pod.id, None)
        if process is not None:
            _end_tree(process)
            _kill_container(pod.id, port)
        # A terminated pod's container disk is gone: so are the token and Ray's files it held.
        for variable in ("RAY_TOKEN_FILE", "RAY_TEMP_DIR"):
            path = Path(pod.env.get(variable, "/nonexistent"))
            folder = path.parent if variable == "RAY_TOKEN_FILE" else path
            if str(folder).startswith("/tmp/gp-"):
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            processes = list(self._processes.values())
            self._processes.clear()
        for process in processes:
            _end_tree(process)
        shutil.rmtree(self.folder, ignore_errors=True)


def _container_pids(pod_id: str, ssh_port: int) -> list[int]:
    """The processes of a fake pod's container: those that inherited the pod's ``RUNPOD_POD_ID`` (the node,
    sshd, Ray's daemons, though in sessions of their own), and sshd's per-connection processes (sshd starts
    them with an environment of their own), found by the pod's SSH port they serve."""
    import psutil

    marker = f"RUNPOD_POD_ID={pod_id}".encode()
    pids = set()
    for connection in psutil.net_connections("tcp"):  # the connections home made to the pod's sshd
        if connection.pid and connection.laddr and connection.laddr.port == ssh_port and connection.raddr:
            try:
                if psutil.Process(connection.pid).name().startswith("sshd"):
                    pids.add(connection.pid)
            except psutil.Error:
                continue
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    if marker in environ.read().split(b"\0"):
                        pids.add(int(entry))
            except OSError:
                continue
    return sorted(pids - {os.getpid()})


def _kill_container(pod_id: str, ssh_port: int, timeout_s: float = 10.0) -> None:
    """SIGKILL what is left of a pod's container until nothing is."""
    deadline = time.monotonic() + timeout_s
    while (pids := _container_pids(pod_id, ssh_port)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


def _container_ends_with_its_main_process(pod_id: str, ssh_port: int, process: subprocess.Popen) -> None:
    """As in a container: once the entrypoint (PID 1 there) exits, whatever it left is killed. Without this a
    node whose Ray failed would leave sshd's connection processes up, and home's tunnel would wait out its
    timeout instead of seeing the pod go, as it does on RunPod."""
    process.wait()
    _kill_container(pod_id, ssh_port)


def _end_tree(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the entrypoint (it stops Ray and sshd itself), then kill whatever of its tree is left."""
    import psutil

    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    sessions = {process.pid}
    for child in tree:
        try:
            sessions.add(os.getsid(child.pid))
        except OSError:
            pass
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    for session in sessions - {os.getsid(0)}:
        subprocess.run(["pkill", "-KILL", "-s", str(session)], check=False)


# ---- the server -------------------------------------------------------------------------------------------

@dataclass
class Injected:
    status: int
    times: int
    retry_after: int | None
    path_prefix: str


class FakeRunPod:
    """The fake API. Use as a context manager; ``url`` is its base URL, ``api_key`` the key it accepts."""

    def __init__(self, runtime: PodRuntime | None = None, *, api_key: str | None = None,
                 provisioning_s: float = 0.2, starting_s: float = 0.2) -> None:
        self.runtime = runtime or NullRuntime()
        self.api_key = api_key or "rpa_" + secrets.token_hex(20)
        self.provisioning_s = provisioning_s
        self.starting_s = starting_s
        self.gpus, self.data_centers = default_catalog()
        self.templates = default_templates()
        self.pods: dict[str, FakePod] = {}
        self.terminated: list[str] = []  # ids, in order
        self.terminated_by: dict[str, str] = {}  # pod id -> "account key" or "pod key"
        self.clusters: dict[str, FakeCluster] = {}
        self.deleted_clusters: list[str] = []  # ids, in order
        self.cluster_deleted_by: dict[str, str] = {}  # cluster id -> "account key" or "pod key"
        self.gone_pods: dict[str, FakePod] = {}  # terminated pods: their bills remain
        self.start_ssh_flags: list[bool] = []  # startSsh of each cluster create (gpu-proxy never sets it)
        self.violations: list[str] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.bodies: list[Any] = []  # JSON bodies received, in order
        self._injected: list[Injected] = []
        self._slow: list[tuple[str, float]] = []  # (path prefix, seconds to wait before answering)
        self._lock = threading.RLock()
        self._stopping: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self._contract = contract()
        self._principal = "account key"  # who makes the request being handled (under _lock)

    # -- life cycle of the server ---------------------------------------------------------------------

    def __enter__(self) -> "FakeRunPod":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-runpod", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            pods = list(self.pods.values())
            self.pods.clear()
            self.clusters.clear()
        for pod in pods:
            self.runtime.stop(pod)
        self.settle()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test controls ------------------------------------------------------------------------------------

    def fail_next(self, status: int = 429, times: int = 1, retry_after: int | None = 1, path_prefix: str = "/") -> None:
        """Answer the next ``times`` requests under ``path_prefix`` with ``status`` (429 or 5xx)."""
        with self._lock:
            self._injected.append(Injected(status, times, retry_after, path_prefix))

    def slow_next(self, seconds: float, path_prefix: str = "/") -> None:
        """Act on the next request under ``path_prefix``, then wait ``seconds`` before answering."""
        with self._lock:
            self._slow.append((path_prefix, seconds))

    def set_stock(self, data_center: str, gpu_id: str, free: int) -> None:
        with self._lock:
            next(dc for dc in self.data_centers if dc.id == data_center).stock[gpu_id] = free

    def live_pods(self) -> list[FakePod]:
        """Pods that exist (and would be billed): not yet terminated (Instant Cluster members included)."""
        with self._lock:
            return list(self.pods.values())

    def live_clusters(self) -> list[FakeCluster]:
        with self._lock:
            return list(self.clusters.values())

    def billed_usd(self, *, pod_id: str | None = None, cluster_id: str | None = None) -> float:
        """The fake's own ledger: what a pod, a cluster (all its members) or everything cost so far."""
        with self._lock:
            every = {**self.gone_pods, **self.pods}
            if pod_id is not None:
                return every[pod_id].billed()
            return sum(pod.billed() for pod in every.values() if cluster_id is None or pod.cluster_id == cluster_id)

    # -- behaviour --------------------------------------------------------------------------------------------

    def _gpu(self, gpu_id: str) -> FakeGpu | None:
        return next((gpu for gpu in self.gpus if gpu.id == gpu_id), None)

    def authorize(self, operation: Operation, header: str | None) -> tuple[int, str] | None:
        """None when ``header`` may make this request; else (status, detail). Sets who is asking."""
        if header == f"Bearer {self.api_key}":
            self._principal = "account key"
            return None
        with self._lock:
            pod = next((p for p in self.pods.values() if header == f"Bearer {p.scoped_key}"), None)
        if pod is None:
            return 401, "invalid api key"
        if (operation.template in ("/v2/pods/{id}", "/v2/pods/{id}/action")
                and operation.path_params.get("id") == pod.id):
            self._principal = "pod key"
            return None
        # ASSUMPTION (undocumented by RunPod): a cluster member's key may delete its own cluster.
        if ((operation.method, operation.template) == ("DELETE", "/v2/clusters/{id}") and pod.cluster_id
                and operation.path_params.get("id") == pod.cluster_id):
            self._principal = "pod key"
            return None
        return 403, "this pod-scoped API key may only act on its own pod"

    def handle(self, operation: Operation, query: Mapping[str, list[str]], body: Any,
               principal: str = "account key") -> tuple[int, Any]:
        key = (operation.method, operation.template)
        with self._lock:
            self._principal = principal
            if key == ("GET", "/v2/pods"):
                members = query.get("includeClusterPods", ["false"])[-1] == "true"
                return 200, {"pods": [pod.to_json() for pod in self._refreshed()
                                      if members or pod.cluster_id is None]}
            if key == ("POST", "/v2/pods"):
                return self._create(body)
            if key == ("GET", "/v2/pods/{id}"):
                pod = self._pod(operation.path_params["id"])
                return (200, pod.to_json()) if pod else _problem(404, "pod not found")
            if key in (("DELETE", "/v2/pods/{id}"), ("POST", "/v2/pods/{id}/action")):
                pod = self._pod(operation.path_params["id"])
                if pod is not None and pod.cluster_id is not None:
                    return _problem(409, f"pod {pod.id} belongs to cluster {pod.cluster_id} and cannot be changed "
                                         f"via the pod endpoints: manage it through /v2/clusters/{pod.cluster_id}")
            if key == ("DELETE", "/v2/pods/{id}"):
                return self._terminate(operation.path_params["id"])
            if key == ("POST", "/v2/pods/{id}/action"):
                return self._action(operation.path_params["id"], body["action"])
            if key == ("GET", "/v2/clusters"):
                self._refreshed()
                return 200, {"clusters": [cluster.to_json(self.pods) for cluster in self.clusters.values()]}
            if key == ("POST", "/v2/clusters"):
                return self._create_cluster(body)
            if key in (("GET", "/v2/clusters/{id}"), ("GET", "/v2/clusters/{id}/pods")):
                self._refreshed()
                cluster = self.clusters.get(operation.path_params["id"])
                if cluster is None:
                    return _problem(404, "cluster not found")
                if operation.template.endswith("/pods"):
                    return 200, {"pods": [self.pods[i].to_json() for i in cluster.pod_ids if i in self.pods]}
                return 200, cluster.to_json(self.pods)
            if key == ("DELETE", "/v2/clusters/{id}"):
                return self._delete_cluster(operation.path_params["id"])
            if key == ("GET", "/v2/billing/pods"):
                return self._billing(query, "podId")
            if key == ("GET", "/v2/billing/clusters"):
                return self._billing(query, "clusterId")
            if key == ("GET", "/v2/catalog/gpus"):
                return 200, {"gpus": self._catalog(query)}
            if key == ("GET", "/v2/catalog/templates"):
                return 200, {"templates": self.templates}
            if key == ("GET", "/v2/catalog/datacenters"):
                return 200, {"dataCenters": self._centres(query)}
        return _problem(501, f"the fake does not implement {operation.method} {operation.template}")

    def _refreshed(self) -> list[FakePod]:
        for pod in self.pods.values():
            if pod.status == "RUNNING" and not self.runtime.alive(pod):
                pod.status = "EXITED"  # the container's process ended
                self._release(pod)
        return list(self.pods.values())

    def _pod(self, pod_id: str) -> FakePod | None:
        self._refreshed()
        return self.pods.get(pod_id)

    def _create(self, body: Mapping[str, Any]) -> tuple[int, Any]:
        gpu = self._gpu(body["gpu"]["id"])
        count = body["gpu"].get("count", 1)
        cloud = body.get("cloud", "SECURE")
        if gpu is None:
            return _problem(400, f"GPU type {body['gpu']['id']!r} does not exist")
        if cloud == "COMMUNITY" and not gpu.community:
            return _problem(400, NO_CAPACITY)
        if count > (gpu.max_secure if cloud == "SECURE" else gpu.max_community):
            return _problem(400, f"gpu.count {count} is above the largest {gpu.id} machine")
        wanted = body.get("dataCenterIds") or [dc.id for dc in self.data_centers]
        for centre in self.data_centers:
            if centre.id not in wanted or centre.stock.get(gpu.id, 0) < count:
                continue
            if body.get("globalNetworking") and not centre.global_network:
                continue
            centre.stock[gpu.id] -= count
            pod_id = "".join(random.choices(string.ascii_lowercase + string.digits, k=14))
            pod = FakePod(pod_id, body["name"], body["image"], gpu.id, count, dict(body.get("env", {})),
                          list(body.get("ports", [])), body.get("disk", 50), cloud, centre.id,
                          round((gpu.price_secure if cloud == "SECURE" else gpu.price_community) * count, 4),
                          bool(body.get("globalNetworking")), rest_url=self.url)
            self.pods[pod_id] = pod
            threading.Thread(target=self._boot, args=(pod,), daemon=True, name=f"pod-{pod_id}").start()
            return 201, pod.to_json()
        return _problem(400, NO_CAPACITY)

    def _create_cluster(self, body: Mapping[str, Any]) -> tuple[int, Any]:
        compute = body["compute"]
        gpu = self._gpu(compute["gpuTypeId"])
        per_pod, count = compute["gpuCountPerPod"], compute["podCount"]
        if gpu is None:
            return _problem(400, f"GPU type {compute['gpuTypeId']!r} does not exist")
        if per_pod > gpu.max_secure:
            return _problem(400, f"gpuCountPerPod {per_pod} is above the largest {gpu.id} machine")
        self.start_ssh_flags.append(bool(body.get("startSsh")))
        wanted = body.get("dataCenterIds") or [dc.id for dc in self.data_centers]
        centre = next((dc for dc in self.data_centers
                       if dc.id in wanted and dc.stock.get(gpu.id, 0) >= per_pod * count), None)
        if centre is None:  # a cluster is placed in one data centre, all its pods at once, or not at all
            return _problem(400, NO_CAPACITY)
        centre.stock[gpu.id] -= per_pod * count
        cluster = FakeCluster("".join(random.choices(string.ascii_lowercase + string.digits, k=12)), body["name"],
                              body["type"], gpu.id, per_pod, count, centre.id, subnet=1 + len(self.deleted_clusters)
                              + len(self.clusters))
        self.clusters[cluster.id] = cluster
        for rank in range(count):
            pod_id = "".join(random.choices(string.ascii_lowercase + string.digits, k=14))
            pod = FakePod(pod_id, f"{body['name']}-node{rank}", body["image"], gpu.id, per_pod,
                          dict(body.get("env", {})), list(body.get("ports", [])), body.get("disk", 50), "SECURE",
                          centre.id, round(gpu.price_secure * per_pod, 4), False, rest_url=self.url,
                          cluster_id=cluster.id)
            pod.cluster_env = {  # what RunPod sets on every node (docs.runpod.io/instant-clusters/configuration)
                "PRIMARY_ADDR": cluster.address(0), "MASTER_ADDR": cluster.address(0), "PRIMARY_PORT": "29500",
                "MASTER_PORT": "29500", "NODE_ADDR": cluster.address(rank), "NODE_RANK": str(rank),
                "NUM_NODES": str(count), "NUM_TRAINERS": str(per_pod), "HOST_NODE_ADDR": f"{cluster.address(0)}:29500",
                "WORLD_SIZE": str(count * per_pod)}
            self.pods[pod_id] = pod
            cluster.pod_ids.append(pod_id)
            threading.Thread(target=self._boot, args=(pod, rank), daemon=True, name=f"pod-{pod_id}").start()
        return 201, cluster.to_json(self.pods)

    def _delete_cluster(self, cluster_id: str) -> tuple[int, Any]:
        cluster = self.clusters.pop(cluster_id, None)
        if cluster is None:
            return _problem(404, "cluster not found")
        for pod_id in cluster.pod_ids:
            if pod_id in self.pods:
                self._terminate(pod_id)
        self.deleted_clusters.append(cluster_id)
        self.cluster_deleted_by[cluster_id] = self._principal
        return 204, None

    def _billing(self, query: Mapping[str, list[str]], id_field: str) -> tuple[int, Any]:
        size = query.get("bucketSize", ["day"])[-1]
        now = time.time()
        if "lastN" in query:
            if "startTime" in query or "endTime" in query:
                return _problem(400, "lastN is mutually exclusive with startTime/endTime")
            end = _bucket_next(now, size)
            start = end
            for _ in range(int(query["lastN"][-1])):
                start = _bucket_floor(start - 1, size)
        else:
            start = _bucket_floor(_parse_time(query["startTime"][-1]) if "startTime" in query else now - 30 * 86400,
                                  size)
            end_at = _parse_time(query["endTime"][-1]) if "endTime" in query else now
            end = end_at if _bucket_floor(end_at, size) == end_at else _bucket_next(end_at, size)
        wanted = query.get(id_field, [None])[-1]
        every = {**self.gone_pods, **self.pods}
        groups: dict[str, list[FakePod]] = {}
        for pod in every.values():
            owner = pod.id if id_field == "podId" else pod.cluster_id
            if owner is None or (id_field == "podId" and pod.cluster_id is not None):
                continue  # a cluster's members bill as the cluster
            if wanted is None or owner == wanted:
                groups.setdefault(owner, []).append(pod)
        records = []
        bucket = start
        while bucket < end:
            after = _bucket_next(bucket, size)
            for owner, pods in groups.items():
                if not any(t0 < after and (t1 is None or t1 > bucket) for pod in pods for t0, t1, _ in pod.segments):
                    continue
                amount = round(sum(pod.billed(bucket, min(after, now)) for pod in pods), 6)
                record = {"startTime": _stamp(bucket), "endTime": _stamp(after), id_field: owner,
                          "totalAmount": amount, "gpuAmount": amount, "diskAmount": 0.0}
                record.update({"cpuAmount": 0.0} if id_field == "podId" else {"networkingAmount": 0.0})
                records.append(record)
            bucket = after
        total = round(sum(record["totalAmount"] for record in records), 6)
        totals: dict[str, Any] = {"totalAmount": total, "gpuAmount": total, "diskAmount": 0.0}
        totals.update({"cpuAmount": 0.0} if id_field == "podId" else {"networkingAmount": 0.0})
        metadata = {"query": {"startTime": _stamp(start), "endTime": _stamp(end), "bucketSize": size,
                              id_field: wanted},
                    "recordCount": len(records), "totals": totals,
                    ("uniquePodCount" if id_field == "podId" else "uniqueClusterCount"):
                        len({record[id_field] for record in records})}
        return 200, {"records": records, "metadata": metadata}

    def _boot(self, pod: FakePod, rank: int | None = None) -> None:
        time.sleep(self.provisioning_s)
        with self._lock:
            if pod.id not in self.pods or pod.status != "PROVISIONING":
                return
            pod.status = "STARTING"
            if pod.cluster_id is not None:  # RunPod assigns a member's rank and address during provisioning
                pod.cluster_rank, pod.cluster_ip = rank, pod.cluster_env["NODE_ADDR"]
        try:
            ip, port = self.runtime.start(pod)
        except Exception as error:  # noqa: BLE001  (the container failed: the pod shows ERROR)
            with self._lock:
                pod.status, pod.error = "ERROR", str(error)
            return
        time.sleep(self.starting_s)
        with self._lock:
            if pod.id not in self.pods or pod.status != "STARTING":
                self.runtime.stop(pod)  # stopped or terminated meanwhile
                return
            pod.public_ip, pod.ssh_port = ip, port
            pod.status, pod.started_at, pod.started_monotonic = "RUNNING", _now(), time.monotonic()

    def _release(self, pod: FakePod) -> None:
        centre = next(dc for dc in self.data_centers if dc.id == pod.data_center)
        centre.stock[pod.gpu_id] = centre.stock.get(pod.gpu_id, 0) + pod.gpu_count

    def _terminate(self, pod_id: str) -> tuple[int, Any]:
        pod = self.pods.pop(pod_id, None)
        if pod is None:
            return _problem(404, "pod not found")
        if pod.status not in ("EXITED", "ERROR"):
            self._release(pod)
        pod.status = "TERMINATED"
        self.gone_pods[pod_id] = pod
        self.terminated.append(pod_id)
        self.terminated_by[pod_id] = self._principal
        self._stop_container(pod)
        return 204, None

    def _stop_container(self, pod: FakePod) -> None:
        # In the background, as RunPod answers before the container is gone; settle() waits for it.
        thread = threading.Thread(target=self.runtime.stop, args=(pod,), daemon=True)
        self._stopping.append(thread)
        thread.start()

    def settle(self, timeout_s: float = 60.0) -> None:
        """Wait until the containers of stopped and terminated pods are gone."""
        deadline = time.monotonic() + timeout_s
        for thread in list(self._stopping):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _action(self, pod_id: str, action: str) -> tuple[int, Any]:
        pod = self._pod(pod_id)
        if pod is None:
            return _problem(404, "pod not found")
        if action not in FakePod.ACTIONS.get(pod.status, []):
            return _problem(409, f"cannot {action} a pod that is {pod.status}")
        if action == "terminate":
            return self._terminate(pod_id)
        if action == "stop":
            pod.status = "EXITED"
            self._release(pod)
            self._stop_container(pod)
            return 200, pod.to_json()
        return _problem(501, f"the fake does not implement the {action} action")

    def _catalog(self, query: Mapping[str, list[str]]) -> list[dict[str, Any]]:
        availability = "AVAILABILITY" in query.get("include", [""])[-1].split(",")
        count = int(query.get("count", ["1"])[-1])
        cloud = query.get("cloud", ["SECURE"])[-1]
        result = []
        for gpu in self.gpus:
            item: dict[str, Any] = {
                "id": gpu.id, "name": gpu.name, "pool": None, "manufacturer": "NVIDIA", "memory": gpu.memory,
                "secure": True, "community": gpu.community,
                "price": {"secure": gpu.price_secure, "community": gpu.price_community},
                "maxCount": {"secure": gpu.max_secure, "community": gpu.max_community if gpu.community else 0}}
            if availability:
                offered = cloud == "SECURE" or gpu.community
                centres = [(dc, dc.stock.get(gpu.id, 0)) for dc in self.data_centers if gpu.id in dc.stock]
                item["availability"] = max((_level(free, count) for _, free in centres if offered), default="NONE",
                                           key=["NONE", "LOW", "MEDIUM", "HIGH"].index)
                if centres and offered:
                    item["dataCenters"] = [{"id": dc.id, "name": dc.name, "availability": _level(free, count)}
                                           for dc, free in centres]
            result.append(item)
        return result

    def _centres(self, query: Mapping[str, list[str]]) -> list[dict[str, Any]]:
        include = query.get("include", [""])[-1].split(",")
        only_global = query.get("globalNetwork", [None])[-1]
        result = []
        for dc in self.data_centers:
            if only_global is not None and dc.global_network != (only_global == "true"):
                continue
            item: dict[str, Any] = {"id": dc.id, "name": dc.name, "region": dc.region,
                                    "globalNetwork": dc.global_network, "networkVolumeTypes": ["STANDARD"],
                                    "compliance": []}
            if "GPU_AVAILABILITY" in include and dc.stock:
                names = {gpu.id: gpu.name for gpu in self.gpus}
                item["gpuAvailability"] = [{"id": gpu_id, "name": names.get(gpu_id, gpu_id),
                                            "availability": _level(free, 1)} for gpu_id, free in dc.stock.items()]
            result.append(item)
        return result


_BUCKET_SECONDS = {"hour": 3600, "day": 86400, "week": 7 * 86400}
_MONDAY = 4 * 86400  # 1970-01-05 was a Monday: weeks start there


def _bucket_floor(t: float, size: str) -> float:
    """The start of the ``size`` bucket (UTC) holding ``t``."""
    if size in _BUCKET_SECONDS:
        offset = _MONDAY if size == "week" else 0
        return t - (t - offset) % _BUCKET_SECONDS[size]
    day = datetime.fromtimestamp(t, timezone.utc)
    first = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first if size == "month" else first.replace(month=1)).timestamp()


def _bucket_next(t: float, size: str) -> float:
    """The start of the bucket after the one holding ``t``."""
    start = _bucket_floor(t, size)
    if size in _BUCKET_SECONDS:
        return start + _BUCKET_SECONDS[size]
    first = datetime.fromtimestamp(start, timezone.utc)
    if size == "month":
        return (first + timedelta(days=32)).replace(day=1).timestamp()
    return first.replace(year=first.year + 1).timestamp()


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _problem(status: int, detail: str, errors: list[str] | None = None) -> tuple[int, Any]:
    titles = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
              422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
              501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable"}
    body: dict[str, Any] = {"title": titles.get(status, "Error"), "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return status, body


class _Handler(BaseHTTPRequestHandler):
    fake: FakeRunPod
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_DELETE = do_PATCH = do_PUT = do_GET

    def _serve(self) -> None:
        fake = self.fake
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        operation = fake._contract.match(self.command, parts.path)
        extra_headers: dict[str, str] = {}
        if operation is None:
            with fake._lock:
                fake.violations.append(f"{self.command} {parts.path}: no such operation in the contract")
            self._send(None, *_problem(404, f"no route for {self.command} {parts.path}"))
            return
        problems = fake._contract.check_request(operation, query, dict(self.headers), raw)
        body = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                pass
        with fake._lock:
            fake.bodies.append(body)
            injected = next((item for item in fake._injected if parts.path.startswith(item.path_prefix)), None)
            if injected is not None:
                injected.times -= 1
                if injected.times <= 0:
                    fake._injected.remove(injected)
            slow = next((item for item in fake._slow if parts.path.startswith(item[0])), None)
            if slow is not None:
                fake._slow.remove(slow)
        if problems:
            with fake._lock:
                fake.violations += [f"{self.command} {parts.path}: {problem}" for problem in problems]
            status = 422 if any(p.startswith("body") for p in problems) else 400
            if any(p.startswith("header Authorization") for p in problems):
                status = 401
            self._send(operation, *_problem(status, "request validation failed", problems))
            return
        if injected is not None:
            if injected.retry_after is not None and injected.status == 429:
                extra_headers["Retry-After"] = str(injected.retry_after)
            self._send(operation, *_problem(injected.status, "injected failure"), headers=extra_headers)
            return
        with fake._lock:
            refused = fake.authorize(operation, self.headers.get("Authorization"))
            if refused is not None:
                self._send(operation, *_problem(*refused))
                return
            principal = fake._principal
        status, answer = fake.handle(operation, query, body, principal)
        if slow is not None:
            time.sleep(slow[1])
        self._send(operation, status, answer)

    def _send(self, operation: Operation | None, status: int, answer: Any, headers: Mapping[str, str] = {}) -> None:
        payload = b"" if answer is None else json.dumps(answer).encode()
        with self.fake._lock:
            self.fake.requests.append((self.command, urlsplit(self.path).path, status))
        content_type = "application/json" if status < 400 else "application/problem+json"
        if operation is not None:
            problems = self.fake._contract.check_response(operation, status, content_type if payload else "", payload)
            if problems:
                with self.fake._lock:
                    self.fake.violations += [f"{operation.method} {self.path} (fake's answer): {p}" for p in problems]
        try:
            self.send_response(status)
            if payload:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)


def new_fake(runtime: PodRuntime | None = None, **options: Any) -> FakeRunPod:
    return FakeRunPod(runtime, **options).__enter__()

