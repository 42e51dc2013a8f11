"""Small exchanges between the ranks of one run, over the run's rendezvous point.

The core gives each run one rendezvous point (rank 0's ``master_addr:master_port``). Rank 0 listens
there; every other rank connects and sends one JSON line. Two uses: every worker learns every
worker's address (what TensorFlow's ``TF_CONFIG`` needs), and rank 0 collects the other ranks'
metric states at the end of a sharded ``evaluate``. Plain TCP with JSON: no framework, no extra Ray
actor (which would cost a process), and nothing a peer sends is ever unpickled.
"""
from __future__ import annotations

import json
import socket
import time
from typing import Any

CONNECT_TIMEOUT_S = 120.0
MESSAGE_TIMEOUT_S = 30.0  # a connected rank sends its one line at once


def free_port(host: str = "") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the rendezvous peer closed the connection early")
        data += chunk
    return data.decode()


class Collector:
    """Rank 0's end. It listens from the moment it is made, so a rank that gets there first can
    connect and send at once; ``collect`` then reads the messages whenever rank 0 is ready."""

    def __init__(self, port: int, host: str = "") -> None:
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((host, port))
        self._server.listen(128)
        self._peers: list[socket.socket] = []

    def collect(self, count: int, timeout: float | None = CONNECT_TIMEOUT_S) -> dict[int, Any]:
        """The values ``count`` other ranks sent, by rank. A connection that sends no well-formed
        message in time (a port scan, a stray client) is dropped, not taken as a rank."""
        received: dict[int, Any] = {}
        self._server.settimeout(timeout)
        while len(received) < count:
            conn, _ = self._server.accept()
            conn.settimeout(MESSAGE_TIMEOUT_S)
            try:
                message = json.loads(_read_line(conn))
                rank, value = int(message["rank"]), message["value"]
            except (OSError, ValueError, KeyError, TypeError):
                conn.close()
                continue
            self._peers.append(conn)
            received[rank] = value
        return received

    def reply(self, value: Any) -> None:
        """Send ``value`` back to every rank collected so far."""
        line = (json.dumps(value) + "\n").encode()
        for conn in self._peers:
            conn.sendall(line)

    def close(self) -> None:
        for conn in self._peers:
            conn.close()
        self._server.close()

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def send_to_rank0(rank: int, value: Any, master_addr: str, master_port: int,
                  wait_for_reply: bool = False, timeout: float = CONNECT_TIMEOUT_S,
                  connect_timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """Send ``value`` (JSON-able) to rank 0's :class:`Collector`; return its reply when asked to wait
    (up to ``timeout``). Rank 0 must be listening within ``connect_timeout``."""
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            conn = socket.create_connection((master_addr, master_port), timeout=timeout)
            break
        except OSError:  # rank 0 is not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank} could not reach rank 0 at {master_addr}:{master_port} "
                                   f"within {connect_timeout:g} s") from None
            time.sleep(0.05)
    with conn:
        conn.sendall((json.dumps({"rank": rank, "value": value}) + "\n").encode())
        return json.loads(_read_line(conn)) if wait_for_reply else None


def all_gather_addresses(rank: int, world_size: int, own_address: str,
                         master_addr: str, master_port: int) -> list[str]:
    """Return every rank's ``own_address``, in rank order."""
    if world_size == 1:
        return [own_address]
    if rank != 0:
        return send_to_rank0(rank, own_address, master_addr, master_port, wait_for_reply=True)
    with Collector(master_port) as collector:
        addresses = {0: own_address, **collector.collect(world_size - 1)}
        ordered = [addresses[r] for r in range(world_size)]
        collector.reply(ordered)
        return ordered
