"""A "machine" of our own for Ray's cluster launcher: a real sshd on 127.0.0.1 inside its own PID and mount
namespace, with a private home folder for root.

Why a namespace: Ray's launcher runs ``ray stop`` on the head at ``ray down``, and ``ray stop`` kills every
Ray process it can see. On this machine other Ray clusters (other tests, other sessions) run; inside the
namespace ``ray stop`` sees only the launcher's own. The private home keeps what the launcher writes
(``~/ray_bootstrap_config.yaml``, ``~/ray_bootstrap_key.pem``, the token) out of the real one, and its
``.bashrc`` puts this virtualenv's ``ray`` on the PATH of the launcher's login shells.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.sshd import SSHD, _keygen, free_port, ssh_banner_answers, sshd_missing_reason


def namespace_missing_reason() -> str | None:
    reason = sshd_missing_reason()
    if reason:
        return reason
    for tool in ("unshare", "rsync"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Ray's launcher copies files with rsync; apt-get install {tool})"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot make a PID namespace here: {probe.stderr.decode(errors='replace').strip()}"
    return None


@dataclass
class NamespacedSshd:
    port: int
    user: str
    private_key: str
    home: str  # the namespace's /root
    folder: str
    process: subprocess.Popen

    def namespace_pids(self) -> list[int]:
        """Every process in the namespace, seen from here (its init and sshd included)."""
        mine = os.readlink(f"/proc/{self._init_pid()}/ns/pid")
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") == mine:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def ray_processes(self) -> list[str]:
        """Command lines of the Ray processes (raylet, gcs_server, workers...) inside the namespace."""
        found = []
        for pid in self.namespace_pids():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(word in command for word in ("raylet", "gcs_server", "ray::", "dashboard", "ray start",
                                                "default_worker", "log_monitor", "monitor.py")):
                found.append(command.strip())
        return found

    def _init_pid(self) -> int:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0])

    def log(self) -> str:
        return Path(self.folder, "sshd.log").read_text(errors="replace")


def start_namespaced_sshd() -> NamespacedSshd:
    folder = Path(tempfile.mkdtemp(prefix="gp-nsd-", dir="/tmp"))
    home = folder / "home"
    home.mkdir(mode=0o700)
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    _keygen(host_key, "gp-ns-host")
    _keygen(client_key, "gp-ns-client")
    authorized = folder / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    authorized.chmod(0o600)
    bin_dir = Path(sys.executable).parent
    (home / ".bashrc").write_text(
        f"export PATH={bin_dir}:$PATH PYTHONPATH={os.environ.get('PYTHONPATH', os.getcwd())} "
        f"RAY_USAGE_STATS_ENABLED=0\n")
    port = free_port()
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "AllowTcpForwarding yes",
        "X11Forwarding no", "StrictModes no", "UsePAM no", "LogLevel VERBOSE", "",
    ]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
    script = f"mount --bind {home} {Path.home()} && exec {SSHD} -D -e -f {config}"
    with open(folder / "sshd.log", "w") as log:
        process = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "private",
                                    "sh", "-c", script], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True)
    deadline = time.monotonic() + 20
    while not ssh_banner_answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_namespaced_sshd_process(process)
            raise RuntimeError(f"the namespaced sshd did not start:\n{(folder / 'sshd.log').read_text()}")
        time.sleep(0.1)
    return NamespacedSshd(port, getpass.getuser(), str(client_key), str(home), str(folder), process)


def stop_namespaced_sshd_process(process: subprocess.Popen) -> None:
    # The namespace's init is sshd (exec'd); when it dies the kernel kills everything left in the namespace.
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
