"""Errors of the SSH layer, with ssh's own message turned into what to do about it."""
from __future__ import annotations

from gpu_proxy.errors import GpuProxyError


class SSHError(GpuProxyError):
    """ssh could not connect, authenticate, or forward a port."""


class RemoteCommandError(SSHError):
    """The connection worked but the remote command exited non-zero."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


# ssh's stderr phrases -> the likely fix. Checked in order; the first match wins.
_HINTS = (
    ("Permission denied", "authentication failed: check the user name and identity_file (the key must be "
                          "in the remote user's authorized_keys)"),
    ("Host key verification failed", "the host key is unknown or does not match known_hosts: add the host "
                                     "to known_hosts, or use host_key_policy='accept-new' for a new host"),
    ("REMOTE HOST IDENTIFICATION HAS CHANGED", "the host key changed since it was recorded in known_hosts: "
                                               "verify the host, then remove the old entry (ssh-keygen -R)"),
    ("Could not resolve hostname", "the host name does not resolve: check the spelling or use an IP address"),
    ("Connection refused", "nothing listens for SSH at that address: check the host and ssh port"),
    ("Connection timed out", "the host did not answer: check the address, the ssh port and firewalls"),
    ("No route to host", "the host is unreachable from here: check the address and your network"),
    ("Network is unreachable", "the host is unreachable from here: check the address and your network"),
    ("Address already in use", "the local port for the tunnel is taken"),
    ("forwarding failed", "the SSH server refused port forwarding: it needs AllowTcpForwarding yes (or local)"),
    ("administratively prohibited", "the SSH server refused port forwarding: it needs AllowTcpForwarding "
                                    "yes (or local)"),
)


KNOWN_FAILURES = tuple(phrase for phrase, _ in _HINTS)


def explain_ssh_failure(what: str, destination: str, stderr: str) -> SSHError:
    """An :class:`SSHError` for ``what`` (e.g. "run a command") on ``destination`` from ssh's stderr."""
    detail = stderr.strip().splitlines()
    last = detail[-1] if detail else "ssh exited without a message"
    hint = next((fix for phrase, fix in _HINTS if phrase in stderr), None)
    message = f"Could not {what} on {destination} over SSH: {last}"
    if hint:
        message += f"\n  -> {hint}."
    return SSHError(message)
