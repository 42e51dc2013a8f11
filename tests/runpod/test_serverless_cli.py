"""``gpu-proxy serverless deploy|health|purge`` against fakes of RunPod's REST v2 (checked against its
OpenAPI document) and of a serverless endpoint."""
from __future__ import annotations

import argparse

import pytest

from gpu_proxy import RunPodServerless
from gpu_proxy.clouds.runpod.serverless.cli import add_serverless_commands
from gpu_proxy.clouds.runpod.serverless.endpoint_api import EndpointAPI
from gpu_proxy.errors import ConfigurationError
from tests.fakes.runpod_serverless_api import FakeServerlessAPI
from tests.fakes.serverless_endpoint import FakeServerlessEndpoint


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu-proxy")
    add_serverless_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def rest(monkeypatch):
    with FakeServerlessAPI() as fake:
        monkeypatch.setenv("RUNPOD_API_KEY", fake.api_key)
        monkeypatch.setenv("RUNPOD_REST_URL", fake.url)
        yield fake


DEPLOY = ["serverless", "deploy", "--name", "trainer", "--gpu", "HOPPER_141", "--gpu", "ADA_80_PRO",
          "--gpu-count", "2", "--workers-max", "2", "--execution-timeout", "7200",
          "--env", "AWS_SECRET_ACCESS_KEY={{ RUNPOD_SECRET_aws }}"]


def test_deploy_creates_the_endpoint_and_its_template_then_updates_them(rest, capsys):
    args = parse([*DEPLOY, "--image", "me/gpu-proxy-serverless:1"])
    assert args.func(args) == 0
    [endpoint] = rest.endpoints.values()
    [template] = rest.templates.values()
    assert template["name"] == "trainer-gpu-proxy" and template["serverless"] and not template["startSsh"]
    assert endpoint["name"] == "trainer" and endpoint["image"] == "me/gpu-proxy-serverless:1"
    assert endpoint["gpu"]["pools"] == ["HOPPER_141", "ADA_80_PRO"] and endpoint["gpu"]["count"] == 2
    assert endpoint["workers"]["max"] == 2 and endpoint["timeout"] == 7_200_000 and endpoint["type"] == "QUEUE"
    assert endpoint["env"] == {"AWS_SECRET_ACCESS_KEY": "{{ RUNPOD_SECRET_aws }}"}
    out = capsys.readouterr().out
    assert f"created: id {endpoint['id']}" in out and rest.api_key not in out

    args = parse([*DEPLOY, "--image", "me/gpu-proxy-serverless:2", "--workers-max", "3"])
    assert args.func(args) == 0
    assert list(rest.endpoints) == [endpoint["id"]] and len(rest.templates) == 1  # updated in place
    assert rest.endpoints[endpoint["id"]]["image"] == "me/gpu-proxy-serverless:2"
    assert rest.endpoints[endpoint["id"]]["workers"]["max"] == 3
    assert [(m, p) for m, p, _ in rest.requests if m in ("POST", "PATCH")] == [
        ("POST", "/v2/templates"), ("POST", "/v2/serverless"),
        ("PATCH", f"/v2/templates/{template['id']}"), ("PATCH", f"/v2/serverless/{endpoint['id']}")]
    assert "updated" in capsys.readouterr().out
    assert rest.violations == []

    # resources() reads one worker's GPUs from the endpoint's configuration
    cluster = RunPodServerless(endpoint["id"], api_key=rest.api_key, base_url="http://127.0.0.1:9/v2",
                               rest_base_url=rest.url)
    assert cluster.resources() == {"GPU": 2.0}


def test_deploy_refuses_bad_settings_before_calling_runpod(rest):
    args = parse([*DEPLOY, "--image", "x", "--workers-min", "3", "--workers-max", "1"])
    with pytest.raises(ConfigurationError, match="min <= max"):
        args.func(args)
    with pytest.raises(ConfigurationError, match="NAME=VALUE"):
        args = parse([*DEPLOY, "--image", "x", "--env", "oops"])
        args.func(args)
    assert rest.requests == []
    with pytest.raises(SystemExit):
        parse(["serverless", "deploy", "--name", "x", "--image", "y"])  # --gpu is required


def test_health_and_purge(monkeypatch, capsys):
    with FakeServerlessEndpoint(workers_max=0) as endpoint:  # no worker: jobs wait in the queue
        monkeypatch.setenv("RUNPOD_API_KEY", endpoint.api_key)
        monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", endpoint.base_url)
        api = EndpointAPI(endpoint.endpoint_id)
        jobs = [api.run({"n": n}) for n in range(2)]
        assert [api.status(job)["status"] for job in jobs] == ["IN_QUEUE", "IN_QUEUE"]
        args = parse(["serverless", "health", endpoint.endpoint_id])
        assert args.func(args) == 0
        assert "inQueue 2" in capsys.readouterr().out
        args = parse(["serverless", "purge", endpoint.endpoint_id])
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert "2 queued job(s) removed" in out and endpoint.api_key not in out
        assert api.health()["jobs"]["inQueue"] == 0
        assert ("POST", f"/v2/{endpoint.endpoint_id}/purge-queue") in endpoint.requests
