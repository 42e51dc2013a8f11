"""``python -m gpu_proxy.clouds.ray_launcher.relay HOST PORT``: an SSH ``ProxyCommand`` to ``HOST:PORT``.

Ray's launcher always connects to port 22 (its SSH runner has no port option); a machine whose sshd
listens elsewhere is reached with this relay as ``auth.ssh_proxy_command`` (stdin/stdout <-> TCP).
"""
from __future__ import annotations

import os
import socket
import sys
import threading


def relay(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.settimeout(None)

        def upstream() -> None:
            while chunk := os.read(0, 65536):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        threading.Thread(target=upstream, daemon=True).start()
        while chunk := sock.recv(65536):
            os.write(1, chunk)


if __name__ == "__main__":
    relay(sys.argv[1], int(sys.argv[2]))
