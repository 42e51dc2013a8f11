"""Every worker learns every worker's address: what TensorFlow's ``TF_CONFIG`` needs.

The core gives each run one rendezvous point (rank 0's ``master_addr:master_port``). Rank 0 listens
there; every other rank connects, sends its own ``host:port`` and receives the full list in rank
order. Plain TCP with JSON lines: no framework and no extra Ray actor (which would cost a process).
"""
from __future__ import annotations

import json
import socket
import time

CONNECT_TIMEOUT_S = 120.0


def free_port(host: str = "") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("the rendezvous peer closed the connection early")
        data += chunk
    return data.decode()


def all_gather_addresses(rank: int, world_size: int, own_address: str,
                         master_addr: str, master_port: int) -> list[str]:
    """Return every rank's ``own_address``, in rank order."""
    if world_size == 1:
        return [own_address]
    if rank == 0:
        return _serve(world_size, own_address, master_port)
    return _join(rank, own_address, master_addr, master_port)


def _serve(world_size: int, own_address: str, port: int) -> list[str]:
    addresses = {0: own_address}
    peers: list[socket.socket] = []
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("", port))
        server.listen(world_size)
        server.settimeout(CONNECT_TIMEOUT_S)
        try:
            while len(addresses) < world_size:
                conn, _ = server.accept()
                conn.settimeout(CONNECT_TIMEOUT_S)
                message = json.loads(_read_line(conn))
                addresses[message["rank"]] = message["address"]
                peers.append(conn)
            ordered = [addresses[r] for r in range(world_size)]
            for conn in peers:
                conn.sendall((json.dumps(ordered) + "\n").encode())
            return ordered
        finally:
            for conn in peers:
                conn.close()


def _join(rank: int, own_address: str, master_addr: str, master_port: int) -> list[str]:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            conn = socket.create_connection((master_addr, master_port), timeout=CONNECT_TIMEOUT_S)
            break
        except OSError:  # rank 0 is not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank} could not reach rank 0 at {master_addr}:{master_port} "
                                   f"within {CONNECT_TIMEOUT_S:g} s") from None
            time.sleep(0.05)
    with conn:
        conn.sendall((json.dumps({"rank": rank, "address": own_address}) + "\n").encode())
        return json.loads(_read_line(conn))
