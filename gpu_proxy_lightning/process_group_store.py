"""torch.distributed's rendezvous store and gloo/NCCL sockets on a private address, never on every interface.

Left to itself, ``init_process_group("env://")`` makes rank 0 host the TCPStore on ``MASTER_PORT`` bound
to all interfaces, with no authentication: anyone who can reach the node can read and write the
process group's keys. Gloo and NCCL then open their own listeners on whatever interface the host
name resolves to. So, before the process group starts, every rank calls :func:`serve`:

- rank 0 binds the store's socket itself, on loopback when the run is on one node, else on its node's
  address as Ray knows it (the cluster's private interface), and starts the TCPStore server on that
  socket (``TCPStore(master_listen_fd=...)``);
- every rank's ``env://`` rendezvous then connects as a client only (``TORCHELASTIC_USE_AGENT_STORE``:
  torch's own switch for "someone else already hosts the store", see ``torch.distributed.rendezvous``);
- ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` name the same interface, so the collectives' pair
  sockets are on it too.

The worker process is pooled by Ray and reused for later runs: :meth:`PrivateStore.close` stops the
server and puts the environment back. Call it after ``destroy_process_group``.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import psutil

LOOPBACK = "127.0.0.1"
STORE_TIMEOUT = timedelta(minutes=30)  # torch's default for the process group's store

#: The variables serve() sets, and restores on close().
_ENV_KEYS = ("MASTER_ADDR", "TORCHELASTIC_USE_AGENT_STORE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class PrivateStore:
    """What :func:`serve` set up on one rank; ``close()`` undoes it (idempotent)."""

    def __init__(self, saved_env: dict[str, str | None], server: Any = None) -> None:
        self._saved_env = saved_env
        self._server = server  # rank 0's TCPStore: it serves as long as this reference lives
        self.address: str = os.environ["MASTER_ADDR"]
        self.interface: str = os.environ["GLOO_SOCKET_IFNAME"]

    def close(self) -> None:
        self._server = None  # the TCPStore's daemon stops, and closes its socket, with the object
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def __enter__(self) -> "PrivateStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(ctx: Any, node_address: str | None = None) -> PrivateStore:
    """Make this rank's coming ``init_process_group("env://")`` use a store on a private address.

    ``ctx`` is the run's WorkerContext (``rank``, ``world_size``, ``num_nodes``, ``master_addr``,
    ``master_port``). ``node_address`` is this node's address as the cluster knows it (default: Ray's
    ``get_node_ip_address()``); on a multi-node run its interface carries gloo's and NCCL's sockets.
    """
    single_node = ctx.num_nodes == 1
    host = LOOPBACK if single_node else ctx.master_addr
    if single_node:
        own = LOOPBACK
    else:
        own = node_address or _ray_node_address()
    interface = interface_of(own)
    saved = {key: os.environ.get(key) for key in _ENV_KEYS}
    server = _start_server(host, ctx.master_port, ctx.world_size) if ctx.rank == 0 else None
    os.environ.update({"MASTER_ADDR": host, "TORCHELASTIC_USE_AGENT_STORE": "True",
                       "GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface})
    return PrivateStore(saved, server)


def interface_of(address: str) -> str:
    """The name of this machine's network interface that holds ``address`` (e.g. ``lo``, ``eth0``)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address == address for entry in addresses):
            return name
    raise RuntimeError(f"no network interface of this node has the address {address}; the process group "
                       "cannot be kept to the cluster's private network")


def _start_server(host: str, port: int, world_size: int) -> Any:
    """The TCPStore server on ``host:port`` only, on a socket bound here (torch would bind every interface)."""
    from torch.distributed import TCPStore

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        server = TCPStore(host, port, world_size, is_master=True, timeout=STORE_TIMEOUT,
                          wait_for_workers=False, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now and closes it when it stops
    return server


def _ray_node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()
