"""How the RunPod cost meter (gpu_proxy/clouds/runpod/meter.py) publishes its reading to the cluster's
dashboard: through the one HTTP transport, a tick with the dashboard's retries, the budget's reading
with more; a reading that does not arrive is a missed tick, logged at debug."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpu_proxy.clouds.runpod.meter import CostMeter
from gpu_proxy.clusters.base import Endpoint, JobsCluster
from gpu_proxy.runs.cluster_kv import METER, package_name

PUT_PATH = f"/api/packages/gcs/{package_name(*METER)}"


class Dashboard:
    """A Ray dashboard's package store that answers each PUT with the next of ``statuses`` (then 200)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.puts: list[tuple[int, dict]] = []  # (status answered, the reading)
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.path == PUT_PATH and self.headers["Authorization"] == "Bearer t0ken"
                status = dashboard.statuses.pop(0) if dashboard.statuses else 200
                dashboard.puts.append((status, json.loads(body)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802  (GET /api/jobs/: the cluster runs no Ray Job)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"[]")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class Pods(JobsCluster):
    def __init__(self, url: str) -> None:
        self.url = url

    def start(self) -> None:
        pass

    def resources(self) -> dict[str, float]:
        return {}

    def endpoint(self) -> Endpoint:
        return Endpoint(self.url, token="t0ken")


@pytest.fixture
def dashboard():
    dashboard = Dashboard()
    yield dashboard
    dashboard.server.shutdown()
    dashboard.server.server_close()


def test_a_tick_has_the_dashboards_retries_and_a_reading_that_does_not_arrive_is_a_missed_tick(dashboard, caplog):
    meter = CostMeter(Pods(dashboard.url), lambda: 1.0)
    dashboard.statuses = [503]  # the dashboard busy for a moment: retried
    meter.tick()
    assert [status for status, _ in dashboard.puts] == [503, 200]
    assert dashboard.puts[-1][1] == {"spent_usd": 0.0, "usd_per_hour": 1.0, "budget_usd": None, "budget_reached": False}
    dashboard.puts.clear()
    dashboard.statuses = [500, 200]
    with caplog.at_level(logging.DEBUG, logger="gpu_proxy.clouds.runpod.meter"):
        meter.tick()  # no exception: skipped, as a missed heartbeat
    assert [status for status, _ in dashboard.puts] == [500]
    assert [r.levelno for r in caplog.records if "did not reach the cluster" in r.message] == [logging.DEBUG]


def test_the_budgets_reading_is_retried_through_the_transport_before_the_pods_end(dashboard, caplog):
    ended: list[int] = []
    meter = CostMeter(Pods(dashboard.url), lambda: 3600.0, budget_usd=1.0, grace_s=0.0,
                      end=lambda: ended.append(len(dashboard.puts)))
    dashboard.statuses = [500, 502]  # what a tick would not try again (500), then the dashboard busy
    meter.tick()
    assert meter.budget_reached and ended == [3]  # published before the pods end
    assert [status for status, _ in dashboard.puts] == [500, 502, 200]
    assert all(reading["budget_reached"] for _, reading in dashboard.puts)

    dashboard.puts.clear()
    dashboard.statuses = [500] * 10  # never arrives: 3 attempts, a missed reading, and the pods still end
    again = CostMeter(Pods(dashboard.url), lambda: 3600.0, budget_usd=1.0, grace_s=0.0, end=lambda: ended.append(0))
    with caplog.at_level(logging.DEBUG, logger="gpu_proxy.clouds.runpod.meter"):
        again.tick()
    assert len(dashboard.puts) == 3 and ended == [3, 0]
    assert [r.levelno for r in caplog.records if "did not reach the cluster" in r.message] == [logging.DEBUG]


def test_an_injected_publish_gets_each_reading_once(caplog):
    published: list[dict] = []

    def publish(value: bytes) -> None:
        published.append(json.loads(value))
        raise OSError("the store is gone")

    meter = CostMeter(Pods("http://127.0.0.1:9"), lambda: 3600.0, budget_usd=1.0, grace_s=0.0, publish=publish)
    with caplog.at_level(logging.DEBUG, logger="gpu_proxy.clouds.runpod.meter"):
        meter.tick()
    assert [reading["budget_reached"] for reading in published] == [True]
    assert any("did not reach the cluster" in r.message for r in caplog.records)
