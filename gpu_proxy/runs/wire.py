"""Messages between home and a cluster's run server: framed JSON over one TCP connection, after a handshake.

Frame: 4-byte big-endian length, then UTF-8 JSON; bytes inside a message are base64 (the log
codec's encoding). A connection starts with a mutual challenge: each side proves it holds the
home's key (HMAC-SHA256 over the other side's fresh nonce) before anything else is read, so only
a home that registered its key on the cluster (:mod:`gpu_proxy.runs.server_client`) can submit,
and home only talks to a server that could read that key. The key never crosses the wire.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import struct
from typing import Any, Callable

from gpu_proxy.errors import GpuProxyError
from gpu_proxy.runs.log_codec import decode_value, encode_value

MAX_FRAME = 64 * 1024 * 1024  # a run's messages are small; the data plane carries bulk
_LENGTH = struct.Struct(">I")


class WireError(GpuProxyError):
    """The connection broke, or the other side is not who it must be."""


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(encode_value(message), separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(body)) + body)


def receive(sock: socket.socket) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(_read_exactly(sock, _LENGTH.size))
    if length > MAX_FRAME:
        raise WireError(f"a frame of {length} bytes is larger than {MAX_FRAME}: not a gpu-proxy peer")
    return decode_value(json.loads(_read_exactly(sock, length)))


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WireError("the connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _proof(key: bytes, role: str, nonce: str) -> str:
    return hmac.new(key, f"{role}:{nonce}".encode(), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"gpu-proxy-key-id:" + key).hexdigest()[:32]


def client_handshake(sock: socket.socket, key: bytes) -> dict[str, Any]:
    """Home's half; returns the server's hello (its versions)."""
    challenge = receive(sock)
    nonce = secrets.token_hex(16)
    send(sock, {"key_id": key_id(key), "nonce": nonce, "proof": _proof(key, "home", challenge["nonce"])})
    answer = receive(sock)
    if "error" in answer:
        raise WireError(answer["error"])
    if not hmac.compare_digest(str(answer.get("proof", "")), _proof(key, "server", nonce)):
        raise WireError("the run server did not prove it holds this home's key: not the server gpu-proxy started")
    return answer


def server_handshake(sock: socket.socket, find_key: Callable[[str], bytes | None],
                     hello: dict[str, Any]) -> None:
    """The server's half: raises :class:`WireError` (after telling the peer) unless home proves its key."""
    nonce = secrets.token_hex(16)
    send(sock, {"nonce": nonce})
    reply = receive(sock)
    key = find_key(str(reply.get("key_id", "")))
    if key is None or not hmac.compare_digest(str(reply.get("proof", "")), _proof(key, "home", nonce)):
        send(sock, {"error": "this run server does not know that key: register it first"})
        raise WireError("a peer without a registered key")
    send(sock, {**hello, "proof": _proof(key, "server", str(reply.get("nonce", "")))})
