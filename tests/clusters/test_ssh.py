"""The SSH layer against a real sshd on loopback: targets, remote commands, secret files, tunnels."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import psutil
import pytest

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.ssh import RemoteCommandError, SSHError, SSHTarget, SSHTunnel, free_local_port, put_file, run_remote
from tests.support.sshd import generate_client_key, sshd  # noqa: F401  (session fixture)


def test_destinations_parse_with_user_host_and_port():
    target = SSHTarget.parse("ubuntu@10.0.0.5:2222", identity_file=None)
    assert (target.user, target.host, target.port) == ("ubuntu", "10.0.0.5", 2222)
    assert SSHTarget.parse("gpu1", port=2200).port == 2200 and SSHTarget.parse("gpu1").user is None
    v6 = SSHTarget.parse("me@[fd00::5]:23")
    assert (v6.host, v6.port, v6.destination) == ("fd00::5", 23, "me@[fd00::5]:23")


@pytest.mark.parametrize("destination, options, words", [
    ("me@host:port", {}, ["me@host:port", "number"]),
    ("-oProxyCommand=x@h", {}, ["-oProxyCommand=x", "not a valid user"]),
    ("me@-oProxyCommand=evil", {}, ["-oProxyCommand=evil", "not a valid host"]),
    ("me@ho st", {}, ["ho st"]),
    ("me@host", {"port": 0}, ["port=0"]),
    ("me@host", {"identity_file": "/no/such/key"}, ["/no/such/key", "does not exist"]),
    ("me@host", {"host_key_policy": "trust-me"}, ["trust-me", "accept-new"]),
])
def test_bad_destinations_are_refused_before_ssh_runs(destination, options, words):
    with pytest.raises(ConfigurationError) as caught:
        SSHTarget.parse(destination, **options)
    for word in words:
        assert word in str(caught.value)


def test_ssh_options_never_prompt_and_pin_host_keys():
    options = SSHTarget("h", known_hosts_file="/k").ssh_options()
    assert "BatchMode=yes" in options and "StrictHostKeyChecking=accept-new" in options
    assert "UserKnownHostsFile=/k" in options
    assert "StrictHostKeyChecking=yes" in SSHTarget("h", host_key_policy="strict").ssh_options()


def test_run_remote_runs_argument_lists_quoted(sshd):
    result = run_remote(sshd.target(), ["printf", "%s|", "two words", "$HOME", "a;b"])
    assert result.stdout == "two words|$HOME|a;b|"


def test_remote_failure_reports_status_and_stderr(sshd):
    with pytest.raises(RemoteCommandError) as caught:
        run_remote(sshd.target(), "echo broken >&2; exit 7")
    assert caught.value.returncode == 7 and "broken" in str(caught.value)
    assert run_remote(sshd.target(), "exit 3", check=False).returncode == 3


def test_put_file_writes_0600_and_keeps_the_secret_off_command_lines(sshd, tmp_path, monkeypatch):
    secret = "tok-" + os.urandom(16).hex()
    seen = []
    real_run = subprocess.run

    def recording_run(args, *rest, **kwargs):  # the real ssh runs; we keep its argv
        seen.append(list(args))
        return real_run(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    remote = tmp_path / "deep" / "token"
    remote.parent.mkdir()
    put_file(sshd.target(), str(remote), secret)
    assert remote.read_text() == secret
    assert oct(remote.stat().st_mode & 0o777) == "0o600"
    assert seen and not any(secret in " ".join(argv) for argv in seen)
    assert secret not in sshd.log()
    put_file(sshd.target(), str(remote), "second")  # replaces in place
    assert remote.read_text() == "second" and list(remote.parent.iterdir()) == [remote]


def test_wrong_key_is_reported_as_an_authentication_failure(sshd, tmp_path):
    other_key, _ = generate_client_key(str(tmp_path))
    with pytest.raises(SSHError, match="authentication failed") as caught:
        run_remote(sshd.target(identity_file=other_key), "true")
    assert sshd.destination in str(caught.value)


def test_closed_port_is_reported_as_nothing_listening(sshd):
    with pytest.raises(SSHError, match="nothing listens for SSH"):
        run_remote(sshd.target(port=free_local_port()), "true")


def test_unknown_host_key_is_refused_under_strict_policy(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(SSHError, match="host key"):
        run_remote(sshd.target(known_hosts_file=str(empty), host_key_policy="strict"), "true")
    run_remote(sshd.target(known_hosts_file=str(empty), host_key_policy="accept-new"), "true")
    assert "ssh-ed25519" in empty.read_text()  # recorded on first use


@pytest.fixture(scope="module")
def http_server():
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello through ssh")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _ssh_processes_forwarding(local_port: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if f"127.0.0.1:{local_port}:" in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def test_tunnel_forwards_a_loopback_only_port_and_closes_on_exit(sshd, http_server):
    with SSHTunnel(sshd.target(), http_server) as tunnel:
        port = tunnel.local_port
        with urllib.request.urlopen(f"http://{tunnel.local_address}/", timeout=10) as answer:
            assert answer.read() == b"hello through ssh"
        assert len(_ssh_processes_forwarding(port)) == 1
    assert not tunnel.is_open
    assert _ssh_processes_forwarding(port) == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_tunnel_waits_for_the_remote_port_to_answer(sshd):
    remote_port = free_local_port()

    def listen_later():
        time.sleep(2)
        server = socket.socket()
        server.bind(("127.0.0.1", remote_port))
        server.listen()
        connection, _ = server.accept()
        connection.sendall(b"late")
        time.sleep(0.5)
        connection.close()
        server.close()

    threading.Thread(target=listen_later, daemon=True).start()
    started = time.monotonic()
    with SSHTunnel(sshd.target(), remote_port, ready_timeout_s=30):
        assert time.monotonic() - started >= 1.5


def test_tunnel_to_a_port_nobody_serves_times_out_clearly(sshd):
    with pytest.raises(SSHError, match="did not accept connections"):
        SSHTunnel(sshd.target(), free_local_port(), ready_timeout_s=2).open()


def test_tunnel_reports_authentication_failure(sshd, http_server, tmp_path):
    other_key, _ = generate_client_key(str(tmp_path))
    with pytest.raises(SSHError, match="authentication failed"):
        SSHTunnel(sshd.target(identity_file=other_key), http_server).open()


def test_tunnel_is_closed_when_the_interpreter_exits_without_close(sshd, http_server):
    script = textwrap.dedent(f"""
        from gpu_proxy.ssh import SSHTarget, SSHTunnel
        target = SSHTarget("127.0.0.1", user={sshd.user!r}, port={sshd.port}, identity_file={sshd.private_key!r},
                           known_hosts_file={sshd.known_hosts!r}, host_key_policy="strict")
        tunnel = SSHTunnel(target, {http_server}).open()
        print(tunnel.local_port, flush=True)
        # no close(): the interpreter's exit must end ssh
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    port = int(result.stdout.strip())
    deadline = time.monotonic() + 5
    while _ssh_processes_forwarding(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ssh_processes_forwarding(port) == []


def test_tunnel_cannot_be_pickled(sshd, http_server):
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(SSHTunnel(sshd.target(), http_server))
