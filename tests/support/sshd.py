"""A real OpenSSH ``sshd`` on 127.0.0.1, key-only, owned by the test session.

Import the fixture explicitly into a test module::

    from tests.support.sshd import sshd  # noqa: F401
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sshd_missing_reason() -> str | None:
    """Why a real sshd cannot run here, or None when it can."""
    if not Path(SSHD).is_file():
        return "OpenSSH's sshd is not installed (apt-get install openssh-server; `python dev.py test` does it)"
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install openssh-client)"
    if os.geteuid() != 0:
        return "sshd's privilege separation needs root; run the SSH tests as root"
    return None


@dataclass(frozen=True)
class SshdServer:
    host: str
    port: int
    user: str
    private_key: str  # the client key that sshd accepts
    public_key: str  # its public half, one line
    known_hosts: str  # a known_hosts file that lists this server's host key
    folder: str
    process: subprocess.Popen

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def target(self, **options):
        """An :class:`~gpu_proxy.ssh.SSHTarget` for this server, host key pinned."""
        from gpu_proxy.ssh import SSHTarget

        settings = dict(host=self.host, user=self.user, port=self.port, identity_file=self.private_key,
                        known_hosts_file=self.known_hosts, host_key_policy="strict")
        settings.update(options)
        return SSHTarget(**settings)

    def log(self) -> str:
        return Path(self.folder, "sshd.log").read_text(errors="replace")


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


def start_sshd() -> SshdServer:
    folder = Path(tempfile.mkdtemp(prefix="gp-sshd-", dir="/tmp"))
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    _keygen(host_key, "gp-test-host")
    _keygen(client_key, "gp-test-client")
    authorized = folder / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    port = free_port()
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "AllowTcpForwarding yes",
        "X11Forwarding no",
        # The keys live under /tmp, which is world-writable; StrictModes would refuse them. This
        # sshd only listens on loopback for the tests.
        "StrictModes no",
        "UsePAM no",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "",
    ]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
    with open(folder / "sshd.log", "w") as log:
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited at start:\n{(folder / 'sshd.log').read_text()}")
        if ssh_banner_answers(port):
            break
        time.sleep(0.1)
    else:
        stop_sshd_process(process)
        raise RuntimeError("sshd did not answer on its port within 20 s")
    host_public = host_key.with_suffix(".pub").read_text().split()
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")
    return SshdServer(host="127.0.0.1", port=port, user=getpass.getuser(), private_key=str(client_key),
                      public_key=client_key.with_suffix(".pub").read_text().strip(),
                      known_hosts=str(known_hosts), folder=str(folder), process=process)


def stop_sshd_process(process: subprocess.Popen) -> None:
    # sshd's per-connection children share its session; end them all.
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)


@pytest.fixture(scope="session")
def sshd():
    reason = sshd_missing_reason()
    if reason:
        pytest.skip(reason)
    server = start_sshd()
    yield server
    stop_sshd_process(server.process)
    shutil.rmtree(server.folder, ignore_errors=True)


def this_machine_private_ip() -> str | None:
    """A non-loopback, non-public IPv4 address of this machine (what a Ray node on a LAN binds)."""
    import ipaddress

    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET:
                ip = ipaddress.ip_address(address.address)
                if not ip.is_loopback and not ip.is_global and not ip.is_link_local:
                    return str(ip)
    return None


def generate_client_key(folder: str) -> tuple[str, str]:
    """A fresh ed25519 key pair in ``folder``: (private key path, public key line)."""
    path = Path(folder) / "id_ed25519"
    _keygen(path, "gp-test")
    return str(path), path.with_suffix(".pub").read_text().strip()


def ssh_banner_answers(port: int, host: str = "127.0.0.1") -> bool:
    """True when an SSH server greets on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False
