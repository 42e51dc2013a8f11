"""Run a command on a remote machine, and put a small (secret) file there, over SSH."""
from __future__ import annotations

import shlex
import subprocess
from typing import Sequence

from gpu_proxy.ssh.errors import KNOWN_FAILURES, RemoteCommandError, SSHError, explain_ssh_failure
from gpu_proxy.ssh.target import SSHTarget

_SSH_FAILED = 255  # ssh's own exit status when it could not connect or authenticate


def run_remote(target: SSHTarget, command: "str | Sequence[str]", *, input: str | None = None,
               timeout_s: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``command`` on ``target`` and return its result (text stdout/stderr).

    ``command`` is a shell string run by the remote user's shell, or an argument list that is
    quoted for it. ``input`` goes to the command's stdin: the way to hand it a secret, which must
    never be part of ``command`` (the remote ``ps`` would show it).
    """
    remote = command if isinstance(command, str) else shlex.join(command)
    try:
        result = subprocess.run(
            target.ssh_command(remote_command=remote), input=input, capture_output=True, text=True,
            timeout=timeout_s, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SSHError(f"A command on {target.destination} did not finish within {timeout_s:.0f} s over SSH "
                       f"(is the host reachable and the command not waiting for input?).") from None
    if result.returncode == _SSH_FAILED and _looks_like_ssh_failure(result.stderr):
        raise explain_ssh_failure("run a command", target.destination, result.stderr)
    if check and result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:]) or "(no output on stderr)"
        raise RemoteCommandError(
            f"A command on {target.destination} exited with status {result.returncode}:\n{tail}",
            result.returncode)
    return result


def _looks_like_ssh_failure(stderr: str) -> bool:
    # 255 is also a legal exit status of the remote command; ssh's own failures say why.
    return (not stderr.strip() or stderr.lstrip().startswith(("ssh:", "kex_", "Connection", "@@@"))
            or any(phrase in stderr for phrase in KNOWN_FAILURES))


def remote_path_expression(path: str) -> str:
    """``path`` quoted for a POSIX shell; a leading ``~/`` still means the remote user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def put_file(target: SSHTarget, remote_path: str, content: str, *, mode: int = 0o600,
             timeout_s: float = 60.0) -> None:
    """Write ``content`` to ``remote_path`` on ``target`` with ``mode`` (default 0600).

    The content travels on the ssh session's stdin, never on a command line. The file is written
    under a umask that keeps it private from the first byte, then renamed into place, so a reader
    never sees it half-written or with looser permissions. The parent folder must exist.
    """
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode={oct(mode)} must be a permission mode such as 0o600")
    path = remote_path_expression(remote_path)
    script = (f"umask 077 && tmp={path}.tmp.$$ && cat > \"$tmp\" && chmod {mode:o} \"$tmp\" "
              f"&& mv -f \"$tmp\" {path}")
    run_remote(target, script, input=content, timeout_s=timeout_s)
