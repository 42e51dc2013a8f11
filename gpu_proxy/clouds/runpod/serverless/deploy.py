"""Create or update a serverless endpoint that runs the gpu-proxy handler, through RunPod REST v2.

An endpoint is made from a serverless template (``/v2/templates``: image, env, disk) and the
endpoint's own settings (``/v2/serverless``: GPU pools and count, workers, execution timeout). Both
are found by name, so running ``deploy`` again with a new image or settings updates them in place:
the endpoint keeps its id, and RunPod rolls the new image out as workers are replaced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from gpu_proxy.clouds.runpod.client import RunPodClient
from gpu_proxy.errors import ConfigurationError

TEMPLATE_SUFFIX = "-gpu-proxy"  # the endpoint's template is named after it


@dataclass(frozen=True)
class EndpointSettings:
    name: str
    image: str
    gpu_pools: tuple[str, ...]  # serverless GPU pool ids, e.g. ("HOPPER_141", "ADA_80_PRO")
    gpu_count: int = 1
    workers_min: int = 0
    workers_max: int = 1
    idle_timeout_s: int = 5
    execution_timeout_s: int = 3600
    disk_gb: int = 50
    flashboot: bool = False
    env: Mapping[str, str] = field(default_factory=dict)

    def check(self) -> None:
        problems = []
        if not self.gpu_pools:
            problems.append("give at least one GPU pool (--gpu), e.g. ADA_24 or HOPPER_141: the `pool` field of "
                            "GET /v2/catalog/gpus names them")
        if self.gpu_count < 1:
            problems.append(f"--gpu-count {self.gpu_count}: give 1 or more")
        if not 0 <= self.workers_min <= self.workers_max:
            problems.append(f"--workers-min {self.workers_min} / --workers-max {self.workers_max}: need 0 <= min <= max")
        if not 1 <= self.idle_timeout_s <= 3600:
            problems.append(f"--idle-timeout {self.idle_timeout_s}: RunPod takes 1 to 3600 seconds")
        if self.execution_timeout_s < 1:
            problems.append(f"--execution-timeout {self.execution_timeout_s}: give seconds >= 1")
        if problems:
            raise ConfigurationError("Cannot deploy the endpoint: " + "; ".join(problems) + ".")

    def container(self) -> dict[str, Any]:
        return {"image": self.image, "env": dict(self.env), "disk": self.disk_gb}

    def endpoint_body(self, template_id: str) -> dict[str, Any]:
        return {"templateId": template_id, "gpu": {"pools": list(self.gpu_pools), "count": self.gpu_count},
                "workers": {"min": self.workers_min, "max": self.workers_max, "idleTimeout": self.idle_timeout_s},
                "timeout": self.execution_timeout_s * 1000, "flashboot": "FLASHBOOT" if self.flashboot else "OFF"}


def deploy(client: RunPodClient, settings: EndpointSettings) -> tuple[dict[str, Any], str]:
    """Create or update the endpoint (and its template); RunPod's endpoint and ``"created"``/``"updated"``."""
    settings.check()
    template = _upsert_template(client, settings)
    endpoints = client.call("GET", "/v2/serverless", what="list serverless endpoints")["endpoints"]
    existing = next((e for e in endpoints if e["name"] == settings.name), None)
    body = settings.endpoint_body(template["id"])
    if existing is not None:
        return client.call("PATCH", f"/v2/serverless/{existing['id']}", body=body,
                           what=f"update serverless endpoint {settings.name}"), "updated"
    body.update({"name": settings.name, "type": "QUEUE", "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4}})
    return client.call("POST", "/v2/serverless", body=body, what=f"create serverless endpoint {settings.name}"), "created"


def _upsert_template(client: RunPodClient, settings: EndpointSettings) -> dict[str, Any]:
    name = settings.name + TEMPLATE_SUFFIX
    templates = client.call("GET", "/v2/templates", what="list templates")["templates"]
    existing = next((t for t in templates if t["name"] == name), None)
    if existing is not None:
        if not existing.get("serverless"):
            raise ConfigurationError(f"A pod template named {name!r} exists; rename it, or deploy under another --name.")
        return client.call("PATCH", f"/v2/templates/{existing['id']}", body=settings.container(),
                           what=f"update template {name}")
    return client.call("POST", "/v2/templates", what=f"create template {name}", body={
        "name": name, **settings.container(), "serverless": True, "category": "NVIDIA", "ports": [],
        "startSsh": False, "startJupyter": False})  # the worker needs neither: it only takes jobs
