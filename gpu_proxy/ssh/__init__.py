"""SSH: run commands on, copy secrets to, and tunnel into remote machines (system ``ssh``)."""
from gpu_proxy.ssh.errors import RemoteCommandError, SSHError
from gpu_proxy.ssh.remote import put_file, run_remote
from gpu_proxy.ssh.target import HostKeyPolicy, SSHTarget
from gpu_proxy.ssh.tunnel import SSHTunnel, free_local_port

__all__ = ["HostKeyPolicy", "RemoteCommandError", "SSHError", "SSHTarget", "SSHTunnel", "free_local_port",
           "put_file", "run_remote"]
