"""Where to SSH to, and how: one place that turns a destination into ``ssh`` options.

We drive the system ``ssh`` binary rather than a Python SSH library: it honours the user's
``~/.ssh/config`` (ProxyJump, agents, certificates), its errors are the ones users know how to fix,
``-L`` forwarding runs in its own process (no GIL, no event loop here), and the core needs no extra
dependency.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from gpu_proxy.errors import ConfigurationError

#: ``strict``: the host must already be in known_hosts. ``accept-new``: record a host seen for the
#: first time, refuse one whose key changed (OpenSSH's advice for automation). ``off``: accept any
#: key and record nothing; only for throw-away hosts whose key cannot be known in advance.
HostKeyPolicy = Literal["strict", "accept-new", "off"]
_POLICIES = {"strict": "yes", "accept-new": "accept-new", "off": "no"}
_NAME = re.compile(r"^[A-Za-z0-9_.:%\-]+$")  # a user or host name: no spaces, quotes or shell syntax


@dataclass(frozen=True)
class SSHTarget:
    """A machine reached over SSH: ``user@host:port`` plus the key and host-key checking to use."""

    host: str
    user: str | None = None
    port: int = 22
    identity_file: str | None = None
    known_hosts_file: str | None = None
    host_key_policy: HostKeyPolicy = "accept-new"
    connect_timeout_s: int = 15
    ssh_binary: str = field(default="ssh", repr=False)

    def __post_init__(self) -> None:
        for name, value in (("host", self.host), ("user", self.user)):
            if value is None and name == "user":
                continue
            if not value or value.startswith("-") or not _NAME.match(value):
                raise ConfigurationError(
                    f"SSH {name}={value!r} is not a valid {name} name: use letters, digits, '.', '-', "
                    f"'_' (e.g. 'ubuntu@10.0.0.5').")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigurationError(f"ssh port={self.port!r} must be an integer between 1 and 65535.")
        if self.host_key_policy not in _POLICIES:
            raise ConfigurationError(
                f"host_key_policy={self.host_key_policy!r}: use one of {', '.join(map(repr, _POLICIES))}.")
        if self.identity_file is not None:
            path = Path(self.identity_file).expanduser()
            if not path.is_file():
                raise ConfigurationError(
                    f"identity_file={self.identity_file!r} does not exist: pass the path of your SSH private "
                    f"key (e.g. '~/.ssh/id_ed25519').")
            object.__setattr__(self, "identity_file", str(path))
        if self.known_hosts_file is not None:
            object.__setattr__(self, "known_hosts_file", str(Path(self.known_hosts_file).expanduser()))
        if shutil.which(self.ssh_binary) is None:
            raise ConfigurationError(
                f"The ssh client {self.ssh_binary!r} is not installed: install OpenSSH's client "
                f"(apt-get install openssh-client, or your OS's package).")

    @classmethod
    def parse(cls, destination: "str | SSHTarget", **options) -> "SSHTarget":
        """``"user@host"``, ``"user@host:2222"`` or ``"user@[::1]:2222"``; ``options`` fill the rest.

        A port in the destination wins over ``port=`` in ``options``.
        """
        if isinstance(destination, SSHTarget):
            return destination
        if not isinstance(destination, str) or not destination:
            raise ConfigurationError(f"SSH destination {destination!r}: give 'user@host' or 'user@host:port'.")
        user, _, host = destination.rpartition("@")
        port = options.pop("port", 22)
        match = re.match(r"^\[(?P<v6>[^\]]+)\](?::(?P<port>\d+))?$", host)
        if match:
            host, port = match["v6"], int(match["port"]) if match["port"] else port
        elif host.count(":") == 1:
            host, _, text = host.partition(":")
            if not text.isdigit():
                raise ConfigurationError(f"SSH destination {destination!r}: the port after ':' must be a number.")
            port = int(text)
        return cls(host=host, user=user or None, port=port, **options)

    @property
    def destination(self) -> str:
        """``user@host:port``, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}:{self.port}"

    def ssh_options(self) -> list[str]:
        """The options every ssh invocation to this target uses (never a secret)."""
        options = [
            "-p", str(self.port),
            "-o", "BatchMode=yes",  # never prompt: a prompt would hang a library call
            "-o", f"ConnectTimeout={self.connect_timeout_s}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-o", f"StrictHostKeyChecking={_POLICIES[self.host_key_policy]}",
            "-o", "LogLevel=ERROR",
        ]
        if self.host_key_policy == "off":
            options += ["-o", f"UserKnownHostsFile={os.devnull}"]
        elif self.known_hosts_file:
            options += ["-o", f"UserKnownHostsFile={self.known_hosts_file}"]
        if self.identity_file:
            options += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        if self.user:
            options += ["-l", self.user]
        return options

    def ssh_command(self, *ssh_args: str, remote_command: str | None = None) -> list[str]:
        """``ssh <options> <ssh_args> host [remote_command]`` as an argument list."""
        command = [self.ssh_binary, *self.ssh_options(), *ssh_args, self.host]
        return command + [remote_command] if remote_command is not None else command

    def with_options(self, **changes) -> "SSHTarget":
        return replace(self, **changes)
