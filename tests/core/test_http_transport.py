"""The one HTTP transport (gpu_proxy/http_transport.py) against a real HTTP server on loopback: what it
retries, how long it waits (recorded, not slept), and that a create whose answer was lost is not made twice."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpu_proxy.clusters.base import Endpoint
from gpu_proxy.clusters.dashboard import DashboardClient
from gpu_proxy.http_transport import HTTPCallError, HTTPTransport, RetryPolicy


class ScriptedServer:
    """Answers each request with the next scripted answer for its (method, path), then 200 ``{}``.
    ``POST /things`` answered below 400 creates a thing before any scripted delay (so the answer may be
    lost after it was made); ``GET /things`` lists them."""

    def __init__(self) -> None:
        self.script: dict[tuple[str, str], list[dict]] = {}
        self.seen: list[tuple[str, str, str]] = []  # (method, path, Authorization)
        self.things: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
                steps = server.script.get((self.command, self.path)) or []
                step = steps.pop(0) if steps else {}
                if (self.command, self.path) == ("POST", "/things") and step.get("status", 200) < 400:
                    server.things.append(json.loads(body))
                time.sleep(step.get("delay_s", 0))
                status = step.get("status", 200)
                payload = json.dumps(step.get("json", server.things if self.path == "/things" else {})).encode()
                try:
                    self.send_response(status)
                    for name, value in step.get("headers", {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            do_GET = do_POST = do_PUT = do_DELETE = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def then(self, method: str, path: str, *steps: dict) -> None:
        self.script.setdefault((method, path), []).extend(steps)

    def calls(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.seen if (m, p) == (method, path))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    server = ScriptedServer()
    yield server
    server.close()


def _transport(server: ScriptedServer, sleeps: list[float], timeout_s: float = 2.0, **policy) -> HTTPTransport:
    policy = {"max_retries": 3, "backoff_s": 1.0, "jitter": False, "sleep": sleeps.append, **policy}
    return HTTPTransport(server.url, service="the test server", headers=lambda: {"Authorization": "Bearer s3cret"},
                         timeout_s=timeout_s, policy=RetryPolicy(**policy), hint="Check the test server.")


def test_503_twice_then_200_is_one_successful_call_with_exponential_backoff(server):
    sleeps: list[float] = []
    server.then("GET", "/thing", {"status": 503}, {"status": 503}, {"json": {"ok": True}})
    assert _transport(server, sleeps).request("GET", "/thing") == {"ok": True}
    assert server.calls("GET", "/thing") == 3 and sleeps == [1.0, 2.0]
    assert all(auth == "Bearer s3cret" for _, _, auth in server.seen)  # every attempt carries the header


def test_429_waits_as_long_as_retry_after_says_capped(server):
    sleeps: list[float] = []
    server.then("GET", "/limited", {"status": 429, "headers": {"Retry-After": "7"}},
                {"status": 429, "headers": {"Retry-After": "120"}}, {"json": [1, 2]})
    assert _transport(server, sleeps, max_backoff_s=30.0).request("GET", "/limited") == [1, 2]
    assert sleeps == [7.0, 30.0]


def test_a_create_whose_answer_timed_out_after_the_server_made_it_is_found_not_made_twice(server):
    sleeps: list[float] = []
    transport = _transport(server, sleeps, timeout_s=0.5)
    server.then("POST", "/things", {"delay_s": 1.5})  # created, then the answer comes after the client's 0.5 s
    find = lambda: next((t for t in transport.request("GET", "/things") if t["name"] == "gp-1"), None)  # noqa: E731
    started = time.monotonic()
    made = transport.create("/things", {"name": "gp-1"}, what="create thing gp-1", find=find)
    assert made == {"name": "gp-1"} and server.things == [{"name": "gp-1"}]
    assert server.calls("POST", "/things") == 1 and len(sleeps) == 1  # one backoff, then the look-up
    assert time.monotonic() - started < 1.5


def test_a_create_answered_5xx_and_not_found_is_posted_again_once(server):
    sleeps: list[float] = []
    transport = _transport(server, sleeps)
    server.then("POST", "/things", {"status": 502})  # refused before anything was made
    find = lambda: next((t for t in transport.request("GET", "/things") if t["name"] == "gp-2"), None)  # noqa: E731
    made = transport.create("/things", {"name": "gp-2"}, what="create thing gp-2", find=find)
    assert made == [{"name": "gp-2"}] == server.things  # the answer of the second POST: the server's list
    assert server.calls("POST", "/things") == 2 and server.calls("GET", "/things") == 1


def test_a_plain_post_is_not_repeated_after_a_5xx(server):
    sleeps: list[float] = []
    server.then("POST", "/run", {"status": 500, "json": {"detail": "worker crashed"}})
    with pytest.raises(HTTPCallError, match="worker crashed") as refused:
        _transport(server, sleeps).request("POST", "/run", body={"x": 1}, what="submit a job")
    assert refused.value.status == 500 and server.calls("POST", "/run") == 1 and sleeps == []


def test_a_persistent_500_ends_with_an_error_naming_the_url_and_what_to_do(server):
    sleeps: list[float] = []
    server.then("GET", "/broken", *[{"status": 500, "json": {"detail": "disk full"}}] * 10)
    with pytest.raises(HTTPCallError) as gave_up:
        _transport(server, sleeps).request("GET", "/broken", what="read the broken thing")
    message = str(gave_up.value)
    assert f"GET {server.url}/broken" in message and "after 4 attempts" in message
    assert "disk full" in message and "Check the test server." in message and "s3cret" not in message
    assert gave_up.value.status == 500 and isinstance(gave_up.value, OSError)
    assert server.calls("GET", "/broken") == 4 and sleeps == [1.0, 2.0, 4.0]


def test_the_dashboard_client_retries_a_busy_dashboard_but_says_a_wrong_address_at_once(server):
    server.then("GET", "/api/jobs/", {"status": 503}, {"json": [{"status": "RUNNING"}]})
    assert DashboardClient(Endpoint(server.url, "tok")).list_jobs() == [{"status": "RUNNING"}]
    assert server.seen[-1][2] == "Bearer tok"
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(HTTPCallError, match="Connection refused") as refused:
        DashboardClient(Endpoint(f"http://127.0.0.1:{port}", "tok")).get_json("/api/version")
    assert refused.value.status is None and time.monotonic() - started < 1.0
    assert "tok" not in str(refused.value)


def test_waiting_for_nodes_rides_out_a_busy_dashboard_and_says_a_refused_token_at_once(server):
    from gpu_proxy.clusters.ray_node import RayNodeError, wait_for_nodes

    nodes = {"data": {"result": {"result": [{"state": "ALIVE", "resources_total": {"CPU": 2.0}}]}}}
    server.then("GET", "/api/v0/nodes?detail=1", {"status": 503}, {"json": nodes}, {"status": 403})
    assert wait_for_nodes(server.url, "tok", 1, timeout_s=5)[0]["resources_total"] == {"CPU": 2.0}
    started = time.monotonic()
    with pytest.raises(RayNodeError, match="refused the token"):
        wait_for_nodes(server.url, "wrong", 1, timeout_s=30)
    assert time.monotonic() - started < 2


def test_the_node_idle_watcher_counts_jobs_through_the_dashboard_client(server, tmp_path):
    from gpu_proxy.clouds.runpod.node.idle_watch import Activity

    token = tmp_path / "ray_token"
    token.write_text("node-token\n")
    activity = Activity(server.url + "/", "127.0.0.1:1", str(token))
    server.then("GET", "/api/jobs/", {"json": [{"status": "RUNNING"}, {"status": "PENDING"}, {"status": "SUCCEEDED"}]},
                {"status": 401, "json": {"detail": "bad token"}})
    assert activity.running_jobs() == 2 and server.seen[-1][2] == "Bearer node-token"
    assert activity.running_jobs() is None  # a refusal, like no answer, counts as busy


def test_a_transport_refuses_to_be_pickled(server):
    import pickle

    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(_transport(server, []))
