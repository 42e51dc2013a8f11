"""Home's side of bringing Ray up on machines it reaches over SSH, shared by :class:`SSHCluster` and
:class:`RunPodCluster`: wait for sshd, deliver the Ray token (a 0600 file, never an environment
variable or a command line), tunnel to the head's dashboard (which listens on the head's loopback
only), wait for every node and GPU to join, and start a process detached from the ssh session.

Cloud-independent: every wait takes a ``failure()`` probe that says why the machines are gone (a
RunPod pod that stopped, a node's ``ray start`` that exited, with its log), so it ends with the cause,
not a timeout; and the error class to raise (RunPod's :class:`LaunchError`, else :class:`RayNodeError`).
"""
from __future__ import annotations

import shlex
import time
from typing import Callable, Iterable, Mapping, Sequence

from gpu_proxy.clusters.ray_node import RayNodeError, wait_for_nodes
from gpu_proxy.ssh import SSHError, SSHTarget, SSHTunnel, put_file, run_remote

Failure = Callable[[], "str | None"]
ErrorType = Callable[[str], Exception]
# The ssh session's own variables must not reach Ray: with SSH_CLIENT set, bash believes it runs under
# sshd and sources ~/.bashrc for every Ray Job entrypoint, which can put another Python first.
SSH_SESSION_VARIABLES = ("SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY", "SSH_AUTH_SOCK")


def wait_for_ssh(target: SSHTarget, timeout_s: float, failure: Failure, hint: str = "",
                 error: ErrorType = RayNodeError) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            run_remote(target, "true", timeout_s=30)
            return
        except SSHError as ssh_error:
            last = str(ssh_error)
        why = failure()
        if why:
            raise error(why)
        if time.monotonic() > deadline:
            raise error(f"sshd on {target.destination} did not answer within {timeout_s:.0f} s: {last}"
                        + (f"\n{hint}" if hint else ""))
        time.sleep(1.0)


def deliver_token(files: Iterable[tuple[SSHTarget, str]], token: str) -> None:
    """Copy the token to each (node, path) as a 0600 file (the node waits for it before starting Ray)."""
    for target, path in files:
        put_file(target, path, token)


def open_dashboard_tunnel(head: SSHTarget, dashboard_port: int, timeout_s: float, failure: Failure,
                          opened: Callable[[SSHTunnel], None], error: ErrorType = RayNodeError) -> SSHTunnel:
    """A local port forwarded to the head's dashboard; returns once the dashboard answers. ``opened`` gets
    the tunnel before it is waited on, so the caller can close it whatever happens."""
    tunnel = SSHTunnel(head, dashboard_port, ready_timeout_s=timeout_s)
    opened(tunnel)
    try:
        tunnel.open(gone=failure)  # a head that failed ends the wait with its cause, not a timeout
    except SSHError as ssh_error:
        raise error(f"The Ray head did not come up on {head.destination}: {failure() or ssh_error}") from None
    return tunnel


def wait_for_nodes_and_gpus(dashboard_url: str, token: str, nodes: int, gpus: float, timeout_s: float,
                            failure: Failure, gpus_seen: Callable[[], float] = lambda: 0.0,
                            error: ErrorType = RayNodeError) -> None:
    """Until ``nodes`` Ray nodes and ``gpus`` GPUs joined. Asking ``failure`` costs a round trip to the
    machines: it runs every ~10th poll (about every 5 s of waiting), not every poll."""
    checks = iter(range(10**9))
    sometimes = lambda: failure() if next(checks) % 10 == 9 else None  # noqa: E731
    try:
        wait_for_nodes(dashboard_url, token, nodes, timeout_s=timeout_s, failure=sometimes)
    except RayNodeError as ray_error:
        raise error(f"Ray did not come up on the nodes: {ray_error}") from None
    deadline = time.monotonic() + timeout_s
    while (found := gpus_seen()) < gpus:
        if time.monotonic() > deadline:
            raise error(f"Ray sees {found:g} of the {gpus:g} GPUs after {timeout_s:.0f} s: the CUDA on the nodes "
                        f"may not match their driver.")
        time.sleep(1.0)


def detached_script(command: Sequence[str] | str, env: Mapping[str, str], log_file: str, *,
                    removals: Sequence[str] = (), path_prefix: str = "", pid_file: str = "") -> str:
    """Shell that starts ``command`` in a session of its own that outlives the ssh connection, with ``env``
    over the session's environment (minus the ssh session's variables and ``removals``), and prints its pid
    (also written to ``pid_file`` when given).

    In a non-interactive shell a background job is not a process-group leader, so setsid makes the new
    session in place and ``$!`` is the command's pid, which is also its session id. A simple command, not
    an && list: a backgrounded list would run in a subshell with its own pid that keeps the session open.
    """
    assignments = [f"{name}={shlex.quote(value)}" for name, value in env.items()]
    if path_prefix:
        assignments.append(f'PATH={shlex.quote(path_prefix)}:"$PATH"')
    unset = " ".join(f"-u {name}" for name in (*removals, *SSH_SESSION_VARIABLES))
    program = command if isinstance(command, str) else shlex.join(command)
    started = f"setsid env {unset} {' '.join(assignments)} {program} > {shlex.quote(log_file)} 2>&1 < /dev/null &\n"
    return started + (f"echo $! > {shlex.quote(pid_file)}; cat {shlex.quote(pid_file)}" if pid_file else "echo $!")
