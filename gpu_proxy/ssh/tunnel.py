"""``ssh -L`` managed by the library: a local port on 127.0.0.1 that reaches host:port behind SSH."""
from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
import time
import weakref
from typing import Callable

from gpu_proxy.ssh.errors import SSHError, explain_ssh_failure
from gpu_proxy.ssh.target import SSHTarget

log = logging.getLogger(__name__)
GONE_CHECK_S = 3.0  # a ``gone`` probe may cost a round trip (ssh, a cloud API): not every 0.2 s


def free_local_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _end_process(process: subprocess.Popen, stderr_file) -> None:
    # Runs from close(), from the weakref finalizer when the tunnel is garbage-collected, and at
    # interpreter exit: it must not reference the tunnel itself.
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    stderr_file.close()


class SSHTunnel:
    """Forward ``127.0.0.1:<local_port>`` here to ``remote_host:remote_port`` as seen from ``target``.

    ``remote_host`` is resolved on the SSH server, so the default ``127.0.0.1`` means "a port the
    remote machine only serves to itself", such as a Ray dashboard bound to loopback. Use it as a
    context manager, or call :meth:`open` and :meth:`close`; it is also closed when it is garbage
    collected and when the interpreter exits.

    ``open()`` returns once ssh forwards and the remote end accepts connections (when
    ``wait_for_remote``), so the first request through the tunnel does not fail.
    """

    def __init__(self, target: SSHTarget, remote_port: int, remote_host: str = "127.0.0.1",
                 local_port: int | None = None, ready_timeout_s: float = 30.0,
                 wait_for_remote: bool = True) -> None:
        if not 0 < int(remote_port) < 65536:
            raise ValueError(f"remote_port={remote_port!r} must be between 1 and 65535")
        self.target = target
        self.remote_host = remote_host
        self.remote_port = int(remote_port)
        self.requested_local_port = local_port
        self.local_port: int | None = None
        self.ready_timeout_s = ready_timeout_s
        self.wait_for_remote = wait_for_remote
        self._process: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    def __repr__(self) -> str:
        state = f"127.0.0.1:{self.local_port}" if self.is_open else "closed"
        return (f"SSHTunnel({state} -> {self.remote_host}:{self.remote_port} via "
                f"{self.target.destination})")

    @property
    def is_open(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def local_address(self) -> str:
        if self.local_port is None:
            raise SSHError("The tunnel is not open.")
        return f"127.0.0.1:{self.local_port}"

    def open(self, gone: Callable[[], str | None] | None = None) -> "SSHTunnel":
        """Start forwarding and wait until it is ready (see the class). ``gone``, asked every few seconds
        of that wait, says why the remote end will never answer (its machine failed), or ``None``: a
        reason ends the wait at once, as an :class:`SSHError` carrying it."""
        if self.is_open:
            return self
        # A free port can be taken between our check and ssh's bind: try a few times.
        attempts = 1 if self.requested_local_port else 3
        for attempt in range(attempts):
            try:
                self._start_ssh(self.requested_local_port or free_local_port())
                self._wait_ready(gone)
                return self
            except SSHError as error:
                self.close()
                if "Address already in use" not in str(error) or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_ssh(self, local_port: int) -> None:
        stderr_file = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block ssh
        forward = f"127.0.0.1:{local_port}:{self.remote_host}:{self.remote_port}"
        command = self.target.ssh_command("-N", "-T", "-L", forward, "-o", "ExitOnForwardFailure=yes",
                                          "-o", "ControlMaster=no", "-o", "ControlPath=none")
        # A session of its own: Ctrl-C in the user's terminal must not kill the tunnel that the
        # library still needs to cancel the remote run cleanly.
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=stderr_file, start_new_session=True)
        self.local_port = local_port
        self._finalizer = weakref.finalize(self, _end_process, self._process, stderr_file)
        self._stderr_file = stderr_file

    def _ssh_stderr(self) -> str:
        self._stderr_file.seek(0)
        return self._stderr_file.read()

    def _wait_ready(self, gone: Callable[[], str | None] | None) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        next_gone_check = time.monotonic() + GONE_CHECK_S
        listening = False
        while time.monotonic() < deadline:
            if gone is not None and time.monotonic() >= next_gone_check:
                why = gone()
                if why:
                    raise SSHError(why)
                next_gone_check = time.monotonic() + GONE_CHECK_S
            if self._process.poll() is not None:
                raise explain_ssh_failure(
                    f"open a tunnel to {self.remote_host}:{self.remote_port}", self.target.destination,
                    self._ssh_stderr())
            state = self._probe()
            listening = listening or state != "closed"
            if state == "answers" or (state == "forwarding" and not self.wait_for_remote):
                log.debug("%r is ready", self)
                return
            time.sleep(0.2)
        where = (f"{self.remote_host}:{self.remote_port} did not accept connections on "
                 f"{self.target.destination}" if listening else "ssh did not start forwarding")
        raise SSHError(f"The SSH tunnel was not ready after {self.ready_timeout_s:.0f} s: {where}.")

    def _probe(self) -> str:
        """``closed``: ssh does not listen yet; ``forwarding``: it listens but the remote end refused;
        ``answers``: the remote end accepted a connection."""
        try:
            connection = socket.create_connection(("127.0.0.1", self.local_port), timeout=2)
        except OSError:
            return "closed"
        with connection:
            # ssh accepts locally first, then asks the server to connect; when that fails it closes
            # our socket at once. A server that accepted waits for us to speak (or greets us).
            connection.settimeout(0.5)
            try:
                return "answers" if connection.recv(1) else "forwarding"
            except socket.timeout:
                return "answers"
            except OSError:
                return "forwarding"

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # idempotent: runs _end_process once
            self._finalizer = None
        self._process = None

    def __enter__(self) -> "SSHTunnel":
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("an SSHTunnel owns a local ssh process and cannot be pickled")
