"""The node image: the Dockerfile checked statically, the entrypoint run for real on this machine.

No Docker engine here: "pods" are entrypoint processes with sshd on a loopback port and Ray on this
machine's private address, which is how the fake RunPod server runs them too.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import psutil
import pytest

from gpu_proxy.clusters.ray_node import RayPorts, generate_token, wait_for_nodes
from gpu_proxy.ssh import SSHTarget, SSHTunnel, put_file, run_remote
from tests.support.sshd import (free_port, generate_client_key, ssh_banner_answers, sshd_missing_reason,
                                this_machine_private_ip)

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "cluster_image"
ENTRYPOINT = IMAGE / "entrypoint.sh"


# ---- the Dockerfile, statically ------------------------------------------------------------------

def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


KNOWN = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "LABEL", "EXPOSE", "ENTRYPOINT", "CMD", "WORKDIR",
         "USER", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile((IMAGE / "Dockerfile").read_text())


def args_of(instructions) -> dict[str, str]:
    result = {}
    for keyword, arguments in instructions:
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            result[name] = default
    return result


def test_dockerfile_parses_into_known_instructions(dockerfile):
    assert dockerfile, "no instructions"
    assert {keyword for keyword, _ in dockerfile} <= KNOWN
    assert dockerfile[0][0] in ("ARG", "FROM")
    froms = [arguments for keyword, arguments in dockerfile if keyword == "FROM"]
    assert froms[-1] == "${CUDA_IMAGE}"
    cuda = args_of(dockerfile)["CUDA_IMAGE"]
    assert cuda.startswith("nvidia/cuda:") and "runtime" in cuda


def test_versions_come_from_build_args_and_match_this_environment(dockerfile):
    args = args_of(dockerfile)
    runs = " ".join(arguments for keyword, arguments in dockerfile if keyword == "RUN")
    for arg, package in [("TORCH_VERSION", "torch"), ("LIGHTNING_VERSION", "lightning"),
                         ("KERAS_VERSION", "keras"), ("TENSORFLOW_VERSION", "tensorflow"),
                         ("RAY_VERSION", "ray")]:
        assert arg in args, f"ARG {arg} missing"
        assert f"{package}==${{{arg}}}" in runs or f"{package}[default,train]==${{{arg}}}" in runs
    assert "${PYTHON_VERSION}" in runs
    # No version is written into a RUN line by hand.
    assert not re.search(r"(torch|lightning|keras|tensorflow|ray(\[[^\]]*\])?)==\d", runs)
    # The defaults are what this environment runs (build_args.py passes them for other setups).
    sys.path.insert(0, str(IMAGE))
    try:
        import build_args
    finally:
        sys.path.remove(str(IMAGE))
    here = build_args.build_args()
    for name, value in here.items():
        if name in args and name not in ("INSTALL_TENSORFLOW", "GPU_PROXY_SOURCE"):  # the source: this tree's digest
            assert args[name] == value, f"ARG {name}={args[name]} but this environment has {value}"
    assert here["RAY_VERSION"] == metadata.version("ray")
    from gpu_proxy.versions import source_digest

    assert here["GPU_PROXY_SOURCE"] == source_digest(ROOT) and here["GPU_PROXY_VERSION"] == metadata.version("gpu-proxy")


def test_entrypoint_the_dockerfile_names_exists_in_the_project(dockerfile):
    entry = [arguments for keyword, arguments in dockerfile if keyword == "ENTRYPOINT"]
    assert len(entry) == 1
    program = json.loads(entry[0])[0]  # exec form, so signals reach it
    copies = [shlex.split(arguments) for keyword, arguments in dockerfile if keyword == "COPY"]
    project_copies = [parts for parts in copies if not parts[0].startswith("--from")]
    assert ["." , "/opt/gpu-proxy"] in project_copies
    source = ROOT / os.path.relpath(program, "/opt/gpu-proxy")
    assert source.is_file() and os.access(source, os.X_OK), source
    assert (source.parent / "entrypoint.py").is_file()
    ignore = (IMAGE / "Dockerfile.dockerignore").read_text()
    assert "!cluster_image/**" in ignore and "!gpu_proxy/**" in ignore


def test_image_exposes_only_ssh_and_ships_no_host_keys_or_secrets(dockerfile):
    exposed = [arguments for keyword, arguments in dockerfile if keyword == "EXPOSE"]
    assert exposed == ["22/tcp"]
    runs = " ".join(arguments for keyword, arguments in dockerfile if keyword == "RUN")
    assert "openssh-server" in runs and "rm -f /etc/ssh/ssh_host_*" in runs
    for keyword, arguments in dockerfile:
        if keyword in ("ENV", "ARG", "LABEL"):
            assert "TOKEN" not in arguments.upper() and "PASSWORD" not in arguments.upper()


# ---- the entrypoint, run for real ----------------------------------------------------------------

def entrypoint_env(**values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "ROLE"))}
    env.update(GPU_PROXY_PYTHON=sys.executable, RAY_USAGE_STATS_ENABLED="0", **values)
    return env


def run_entrypoint(timeout_s: float = 60, **values: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRYPOINT)], env=entrypoint_env(**values), capture_output=True, text=True,
                          timeout=timeout_s)


def test_missing_role_exits_2_and_says_what_to_set():
    result = run_entrypoint(SSHD="off")
    assert result.returncode == 2
    assert "ROLE=None" in result.stderr and "ROLE=head or ROLE=worker" in result.stderr


def test_every_bad_value_is_listed_before_anything_starts(tmp_path):
    result = run_entrypoint(ROLE="worker", PRIVATE_IP="8.8.8.8", NUM_GPUS="two", GCS_PORT="80",
                            PUBLIC_KEY="not a key", SSHD_DIR=str(tmp_path / "sshd"),
                            RAY_TOKEN_FILE="relative/token")
    assert result.returncode == 2
    for expected in ("PRIVATE_IP='8.8.8.8' is a public address", "HEAD_ADDRESS is required",
                     "NUM_GPUS='two'", "GCS_PORT='80'", "PUBLIC_KEY has a line that is not an SSH public key",
                     "RAY_TOKEN_FILE='relative/token'"):
        assert expected in result.stderr, result.stderr
    assert not (tmp_path / "sshd").exists()  # nothing was started or written


def test_a_token_that_never_arrives_ends_the_node_with_status_1(tmp_path):
    result = run_entrypoint(ROLE="head", SSHD="off", RAY_TOKEN_FILE=str(tmp_path / "t" / "token"),
                            RAY_TOKEN_WAIT_S="1")
    assert result.returncode == 1
    assert "no Ray token arrived" in result.stderr


def test_a_token_others_can_read_is_refused(tmp_path):
    token = tmp_path / "token"
    token.write_text(generate_token())
    token.chmod(0o644)
    result = run_entrypoint(ROLE="head", SSHD="off", RAY_TOKEN_FILE=str(token))
    assert result.returncode == 2 and "chmod 600" in result.stderr


def _ray_that_fails_first(folder: Path, then: str) -> Path:
    """A RAY_BIN that counts its starts: the first exits 1 (as ``ray start`` does when its raylet
    missed Ray's 30 s), later ones run ``then``."""
    script = folder / "ray"
    script.write_text(f"#!/bin/sh\necho start >> {folder}/starts\n"
                      f"[ $(wc -l < {folder}/starts) -eq 1 ] && exit 1\n{then}\n")
    script.chmod(0o755)
    return script


def _private_token(folder: Path) -> Path:
    token = folder / "token"
    token.write_text(generate_token())
    token.chmod(0o600)
    return token


def test_a_failed_ray_start_is_tried_once_more_and_the_node_runs_on(tmp_path):
    ray = _ray_that_fails_first(tmp_path, "exec sleep 60")
    node = subprocess.Popen([str(ENTRYPOINT)], env=entrypoint_env(
        ROLE="head", SSHD="off", RAY_TOKEN_FILE=str(_private_token(tmp_path)), RAY_BIN=str(ray)),
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ((tmp_path / "starts").exists() and (tmp_path / "starts").read_text().count("start") == 2):
            assert node.poll() is None and time.monotonic() < deadline, node.stderr.read() if node.poll() else ""
            time.sleep(0.1)
        time.sleep(1)  # the second start runs on: the node keeps going
        assert node.poll() is None
        node.terminate()
        assert node.wait(timeout=30) == 0
    finally:
        if node.poll() is None:
            os.killpg(node.pid, 9)
    assert "Ray exited with status 1 while starting" in node.stderr.read()


def test_a_second_failed_ray_start_ends_the_node_with_rays_status(tmp_path):
    result = run_entrypoint(ROLE="head", SSHD="off", RAY_TOKEN_FILE=str(_private_token(tmp_path)),
                            RAY_BIN=str(_ray_that_fails_first(tmp_path, "exit 3")))
    assert result.returncode == 3, result.stderr
    assert (tmp_path / "starts").read_text().count("start") == 2
    assert "starting it once more" in result.stderr and "Ray exited with status 3" in result.stderr


def _wait_for_banner(port: int, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the entrypoint exited early"
        if ssh_banner_answers(port):
            return
        time.sleep(0.2)
    raise AssertionError("the pod's sshd did not answer")


def _descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.timeout(240)
def test_head_and_worker_pods_form_a_cluster_reached_over_ssh_and_stop_cleanly():
    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    private_ip = this_machine_private_ip()
    if private_ip is None:
        pytest.skip("this machine has no private non-loopback IPv4 address for a two-node Ray cluster")
    folder = tempfile.mkdtemp(prefix="gpci-", dir="/tmp")  # short: Ray's socket paths are length-limited
    key, public_key = generate_client_key(folder)
    head_ports, worker_ports = RayPorts.free_on_this_machine(), RayPorts.free_on_this_machine()
    ssh_port = free_port()
    port_env = lambda ports: {variable: str(getattr(ports, name))  # noqa: E731
                              for name, variable in RayPorts.environment_names().items()}
    head_token_file = f"{folder}/head/secrets/ray_token"
    head = subprocess.Popen([str(ENTRYPOINT)], env=entrypoint_env(
        ROLE="head", PRIVATE_IP=private_ip, RAY_TOKEN_FILE=head_token_file, NUM_CPUS="1", NUM_GPUS="0",
        RAY_TEMP_DIR=f"{folder}/hr", PUBLIC_KEY=public_key, SSHD_PORT=str(ssh_port),
        SSHD_LISTEN_ADDRESS="127.0.0.1", SSHD_DIR=f"{folder}/head/ssh",
        SSH_AUTHORIZED_KEYS=f"{folder}/head/authorized_keys", SSHD_STRICT_MODES="no", **port_env(head_ports)),
        stdout=open(f"{folder}/head.out", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    token = generate_token()
    try:
        _wait_for_banner(ssh_port, head)
        # Home's side, as for a RunPod pod: reach the pod over SSH, deliver the token, tunnel in.
        pod = SSHTarget("127.0.0.1", user="root", port=ssh_port, identity_file=key,
                        known_hosts_file=f"{folder}/known_hosts", host_key_policy="accept-new")
        put_file(pod, head_token_file, token)
        assert run_remote(pod, ["stat", "-c", "%a", head_token_file]).stdout.strip() == "600"
        worker_token = Path(folder, "worker-token")
        worker_token.write_text(token)
        worker_token.chmod(0o600)
        worker = subprocess.Popen([str(ENTRYPOINT)], env=entrypoint_env(
            ROLE="worker", PRIVATE_IP=private_ip, HEAD_ADDRESS=f"{private_ip}:{head_ports.gcs}",
            RAY_TOKEN_FILE=str(worker_token), NUM_CPUS="1", RAY_TEMP_DIR=f"{folder}/wr", SSHD="off",
            **port_env(worker_ports)),
            stdout=open(f"{folder}/worker.out", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        with SSHTunnel(pod, head_ports.dashboard, ready_timeout_s=120) as tunnel:
            url = f"http://{tunnel.local_address}"
            nodes = wait_for_nodes(url, token, 2, timeout_s=150, failure=lambda: (
                "a pod exited:\n" + Path(folder, "head.out").read_text()[-3000:]
                + Path(folder, "worker.out").read_text()[-3000:])
                if head.poll() is not None or worker.poll() is not None else None)
            assert sorted(node["node_ip"] for node in nodes) == [private_ip, private_ip]
            assert sum(node["resources_total"]["CPU"] for node in nodes) == 2
        started = _descendants(head) + _descendants(worker)
        assert any("raylet" in " ".join(p.cmdline()) for p in started)
        head.terminate()
        worker.terminate()
        assert worker.wait(timeout=60) == 0
        assert head.wait(timeout=60) == 0
        deadline = time.monotonic() + 15
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(started) == [], [p.cmdline()[:3] for p in _alive(started)]
        assert "Ray head starting" in Path(folder, "head.out").read_text()
    finally:
        for process in (worker, head):
            if process is not None and process.poll() is None:
                for child in _descendants(process):
                    child.kill()
                process.kill()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
