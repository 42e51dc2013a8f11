"""sshd for the node: the only way in. Keys only, local forwarding only (home's tunnel to the
dashboard), host keys made per container (an image must never ship them)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from gpu_proxy.clouds.runpod.node.output import say
from gpu_proxy.errors import ConfigurationError

_KEY_LINE = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.\-]+)\s+[A-Za-z0-9+/]+=*(\s+\S.*)?$")


@dataclass
class SshdConfig:
    port: int
    listen_address: str
    folder: Path
    authorized_keys: Path
    public_keys: list[str] = field(repr=False)
    strict_modes: bool
    binary: str
    # SetEnv for every session: only the tests' stand-in for a stock image uses it (to say where its
    # pod's environment file is, as several stand-in pods share one machine).
    session_env: dict[str, str] = field(default_factory=dict, repr=False)




def read_sshd_config(env: Mapping[str, str], problems: list[str]) -> SshdConfig | None:
    from gpu_proxy.clouds.runpod.node.config import integer

    mode = env.get("SSHD", "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        problems.append(f"SSHD={mode!r}: use auto, on or off.")
        return None
    keys = [line.strip() for line in env.get("PUBLIC_KEY", "").splitlines() if line.strip()]
    if mode == "off" or (mode == "auto" and not keys):
        return None
    if not keys:
        problems.append("SSHD=on needs PUBLIC_KEY: the SSH public key(s) allowed to log in.")
    for key in keys:
        if not _KEY_LINE.match(key):
            problems.append(f"PUBLIC_KEY has a line that is not an SSH public key: {key[:40]!r}... "
                            "(expected e.g. 'ssh-ed25519 AAAA... me@laptop').")
    binary = env.get("SSHD_BIN") or shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(binary).is_file():
        problems.append(f"sshd is not installed ({binary}); install openssh-server or set SSHD=off.")
    strict = env.get("SSHD_STRICT_MODES", "yes").strip().lower()
    if strict not in ("yes", "no"):
        problems.append(f"SSHD_STRICT_MODES={strict!r}: use yes or no.")
    return SshdConfig(
        port=integer(env, "SSHD_PORT", problems, 1, 65535) or 22,
        listen_address=env.get("SSHD_LISTEN_ADDRESS", "0.0.0.0").strip(),
        folder=Path(env.get("SSHD_DIR") or "/etc/ssh"),
        authorized_keys=Path(env.get("SSH_AUTHORIZED_KEYS") or Path.home() / ".ssh" / "authorized_keys"),
        public_keys=keys, strict_modes=strict != "no", binary=binary)


def start_sshd(config: SshdConfig) -> subprocess.Popen:
    """Write keys and an sshd_config that allows keys only and local forwarding only; start sshd."""
    config.folder.mkdir(parents=True, exist_ok=True)
    host_key = config.folder / "ssh_host_ed25519_key"
    if not host_key.exists():  # made per container: an image must never ship host keys
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpu-proxy-node", "-f",
                        str(host_key)], check=True, stdin=subprocess.DEVNULL)
    config.authorized_keys.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    known = config.authorized_keys.read_text().splitlines() if config.authorized_keys.exists() else []
    config.authorized_keys.write_text("\n".join(known + [k for k in config.public_keys if k not in known]) + "\n")
    config.authorized_keys.chmod(0o600)
    sshd_config = config.folder / "gpu_proxy_sshd_config"
    sshd_config.write_text("\n".join([
        f"Port {config.port}",
        f"ListenAddress {config.listen_address}",
        f"HostKey {host_key}",
        f"PidFile {config.folder / 'gpu_proxy_sshd.pid'}",
        f"AuthorizedKeysFile {config.authorized_keys}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "AllowTcpForwarding local",  # home's -L tunnels to the dashboard; nothing listens on our side
        "GatewayPorts no",
        "X11Forwarding no",
        "PermitTunnel no",
        "AllowAgentForwarding no",
        f"StrictModes {'yes' if config.strict_modes else 'no'}",
        "UsePAM no",
        "Subsystem sftp internal-sftp",
        *[f"SetEnv {name}={value}" for name, value in config.session_env.items()],
        "",
    ]))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation
    check = subprocess.run([config.binary, "-t", "-f", str(sshd_config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise ConfigurationError(f"sshd refused its configuration: {check.stderr.strip()}")
    process = subprocess.Popen([config.binary, "-D", "-e", "-f", str(sshd_config)], stdin=subprocess.DEVNULL,
                               start_new_session=True)
    public = host_key.with_suffix(".pub").read_text().split()
    say(f"sshd listens on {config.listen_address}:{config.port}; host key {public[0]} {public[1]}")
    return process
