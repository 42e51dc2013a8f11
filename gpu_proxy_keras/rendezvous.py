"""Small exchanges between the ranks of one run, over the run's rendezvous point, authenticated.

The core gives each run one rendezvous point (rank 0's ``master_addr:master_port``). Rank 0 listens
there; every other rank connects and sends one JSON line. Two uses: every worker learns every
worker's address (what TensorFlow's ``TF_CONFIG`` needs), and rank 0 collects the other ranks'
metric states at the end of a sharded ``evaluate``. Plain TCP with JSON: no framework, no extra Ray
actor (which would cost a process), and nothing a peer sends is ever unpickled.

Nobody else can take part: rank 0 listens on loopback when the run is on one node, else on its node's
address as the cluster knows it (the private interface), never on every interface; and every message
carries an HMAC-SHA256 with the run's own key (``KerasJob.rendezvous_key``, a new one per run, travelling
beside the payload as a :mod:`gpu_proxy.secrets` value, never inside a pickle or a log). So a stray
client is dropped before anything it sent is parsed, and a rank accepts a reply only from the real
rank 0: the reply is signed over the nonce the rank just chose. A rank's message is signed without a
nonce of rank 0's, so that it can be sent at once, before rank 0 accepts (rank 0 may still be busy
with its own shard for hours): a replay of it can only repeat what that rank sent in this run, since
the key is new each run.

One connection::

    rank r -> rank 0:  HMAC(key, M) M           with M = {"rank", "value", "nonce": Nr}
    rank 0 -> rank r:  HMAC(key, Nr + R) R      (only when rank r waits for a reply)
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import random
import secrets
import socket
import time
from typing import Any

CONNECT_TIMEOUT_S = 120.0
MESSAGE_TIMEOUT_S = 30.0  # a connected rank sends its one line at once
LOOPBACK = "127.0.0.1"


class RendezvousAuthError(ConnectionError):
    """A peer did not prove it holds the run's key."""


def new_key() -> str:
    """A per-run key (give it to the job concealed, see ``remote_fit``)."""
    return secrets.token_hex(32)


def listen_address(ctx: Any) -> str:
    """Where rank 0 listens and the others connect: loopback on one node, else rank 0's node address."""
    return LOOPBACK if ctx.num_nodes == 1 else ctx.master_addr


#: Where a rank's TensorFlow server port comes from: below Linux's ephemeral range (32768-60999), so no
#: outgoing connection on the machine can take it between our pick and TensorFlow's bind (the CI saw
#: "Could not start gRPC server" with kernel-chosen ports), and above Ray's worker ports (10002-19999).
TENSORFLOW_PORTS = range(20000, 32768)


def tensorflow_port(local_rank: int, local_world_size: int) -> int:
    """A port for this rank's TensorFlow server, free on every interface (TensorFlow listens on all).
    Ranks of one node draw from disjoint slots (port = local_rank mod local_world_size), so two of them
    never pick the same one."""
    slots = range(TENSORFLOW_PORTS.start + local_rank, TENSORFLOW_PORTS.stop, local_world_size)
    for port in random.sample(slots, min(len(slots), 256)):
        if is_free_everywhere(port):
            return port
    raise RuntimeError(f"No free port for TensorFlow's server in {TENSORFLOW_PORTS.start}-"
                       f"{TENSORFLOW_PORTS.stop - 1} on this node; free some, or train on fewer workers per node.")


def is_free_everywhere(port: int) -> bool:
    """Whether nothing holds ``port`` on any interface (a dual-stack bind on ``::`` sees IPv4 too)."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine
            continue
        with sock:
            try:
                sock.bind((host, port))
            except OSError as error:
                if family == socket.AF_INET6 and error.errno == errno.EADDRNOTAVAIL:
                    continue
                return False
            return True
    return False


def _mac(key: str, nonce: str, body: bytes) -> str:
    return hmac.new(key.encode(), nonce.encode() + body, hashlib.sha256).hexdigest()


def _signed_line(key: str, nonce: str, message: Any) -> bytes:
    body = json.dumps(message).encode()
    return _mac(key, nonce, body).encode() + b" " + body + b"\n"


def _read_signed(conn: socket.socket, key: str, nonce: str) -> Any:
    """The message of a signed line, parsed only once its MAC checks out."""
    mac, _, body = _read_line(conn).rstrip(b"\n").partition(b" ")
    if not hmac.compare_digest(mac, _mac(key, nonce, body).encode()):
        raise RendezvousAuthError("a rendezvous message did not carry the run's key")
    return json.loads(body)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the rendezvous peer closed the connection early")
        data += chunk
    return data


class Collector:
    """Rank 0's end. It listens from the moment it is made, so a rank that gets there first can
    connect and send at once; ``collect`` then reads the messages whenever rank 0 is ready."""

    def __init__(self, port: int, host: str, key: str) -> None:
        self._key = key
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((host, port))
        self._server.listen(128)
        self._peers: list[tuple[socket.socket, str]] = []  # (connection, the rank's nonce for our reply)

    def collect(self, count: int, timeout: float | None = CONNECT_TIMEOUT_S) -> dict[int, Any]:
        """The values ``count`` other ranks sent, by rank. A connection that sends no message signed
        with the run's key in time (a port scan, a stray client) is dropped, not taken as a rank."""
        received: dict[int, Any] = {}
        self._server.settimeout(timeout)
        while len(received) < count:
            conn, _ = self._server.accept()
            conn.settimeout(MESSAGE_TIMEOUT_S)
            try:
                message = _read_signed(conn, self._key, "")
                rank, value, reply_nonce = int(message["rank"]), message["value"], str(message["nonce"])
            except (OSError, ValueError, KeyError, TypeError):
                conn.close()
                continue
            if rank in received or not 0 < rank:  # a copy of a message already taken: nothing new
                conn.close()
                continue
            self._peers.append((conn, reply_nonce))
            received[rank] = value
        return received

    def reply(self, value: Any) -> None:
        """Send ``value`` back to every rank collected so far."""
        for conn, nonce in self._peers:
            conn.sendall(_signed_line(self._key, nonce, value))

    def close(self) -> None:
        for conn, _ in self._peers:
            conn.close()
        self._server.close()

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def send_to_rank0(rank: int, value: Any, master_addr: str, master_port: int, key: str,
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
        ours = secrets.token_hex(16)
        conn.sendall(_signed_line(key, "", {"rank": rank, "value": value, "nonce": ours}))
        if not wait_for_reply:
            return None
        try:
            return _read_signed(conn, key, ours)
        except RendezvousAuthError:
            raise RendezvousAuthError(f"{master_addr}:{master_port} answered as rank 0 without this run's "
                                      "key") from None


def all_gather_addresses(rank: int, world_size: int, own_address: str,
                         master_addr: str, master_port: int, key: str) -> list[str]:
    """Return every rank's ``own_address``, in rank order (``master_addr``: see :func:`listen_address`)."""
    if world_size == 1:
        return [own_address]
    if rank != 0:
        return send_to_rank0(rank, own_address, master_addr, master_port, key, wait_for_reply=True)
    with Collector(master_port, master_addr, key) as collector:
        addresses = {0: own_address, **collector.collect(world_size - 1)}
        ordered = [addresses[r] for r in range(world_size)]
        collector.reply(ordered)
        return ordered
