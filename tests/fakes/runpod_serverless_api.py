"""A fake of RunPod REST v2's serverless and template operations on 127.0.0.1, for ``deploy``.

``/v2/templates`` (GET, POST), ``/v2/templates/{id}`` (GET, PATCH), ``/v2/serverless`` (GET, POST),
``/v2/serverless/{id}`` (GET, PATCH). Every request and every answer is checked against RunPod's
OpenAPI document with :class:`tests.fakes.openapi_contract.Contract`: a request that breaks it is
answered 422 (body) or 400 (parameter) and recorded in ``violations``, as is an answer of ours that
breaks it, so ``violations == []`` checks the client and the fake alike.
"""
from __future__ import annotations

import json
import secrets
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.openapi_contract import Contract

_contract: Contract | None = None


def contract() -> Contract:
    global _contract
    if _contract is None:
        _contract = Contract()
    return _contract


def _request_urls(endpoint_id: str) -> dict[str, str]:
    base = f"https://api.runpod.ai/v2/{endpoint_id}"
    return {"run": f"{base}/run", "runSync": f"{base}/runsync", "status": f"{base}/status/{{job_id}}",
            "stream": f"{base}/stream/{{job_id}}", "cancel": f"{base}/cancel/{{job_id}}",
            "retry": f"{base}/retry/{{job_id}}", "purgeQueue": f"{base}/purge-queue", "health": f"{base}/health"}


class FakeServerlessAPI:
    def __init__(self, api_key: str = "rp-fake-rest-key-0001") -> None:
        self.api_key = api_key
        self.templates: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.violations: list[str] = []
        self.requests: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeServerlessAPI":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- the operations --------------------------------------------------------------------------
    def _template(self, body: dict[str, Any], template_id: str | None = None) -> dict[str, Any]:
        template = self.templates.get(template_id) or {
            "id": template_id or secrets.token_hex(5), "args": "", "disk": 20, "mounts": {}, "ports": [], "env": {},
            "registry": None, "serverless": False, "public": False, "category": "NVIDIA", "startSsh": True,
            "startJupyter": True, "allowedCudaVersions": []}
        template.update(body)
        self.templates[template["id"]] = template
        return template

    def _endpoint(self, body: dict[str, Any], endpoint_id: str | None = None) -> dict[str, Any]:
        body = dict(body)
        template = self.templates.get(body.pop("templateId", None) or "", {})
        endpoint = self.endpoints.get(endpoint_id or "") or {
            "id": secrets.token_hex(7), "type": "QUEUE", "args": "", "disk": 20, "ports": [], "env": {},
            "registry": None, "dataCenterIds": [], "networkVolumes": [], "timeout": 300000, "flashboot": "OFF",
            "workers": {"min": 0, "max": 3, "idleTimeout": 10},
            "createdAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        endpoint.update({k: template[k] for k in ("image", "args", "disk", "ports", "env", "registry") if k in template})
        gpu = dict(endpoint.get("gpu") or {"count": 1, "allowedCudaVersions": [], "minCudaVersion": None})
        gpu.update(body.pop("gpu", {}))
        endpoint.update(body)
        endpoint["gpu"] = gpu
        endpoint["requestUrls"] = _request_urls(endpoint["id"])
        self.endpoints[endpoint["id"]] = endpoint
        return endpoint

    def _answer(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        with self._lock:
            if parts == ["v2", "templates"]:
                if method == "GET":
                    return 200, {"templates": list(self.templates.values())}
                return 201, self._template(body)
            if parts == ["v2", "serverless"]:
                if method == "GET":
                    return 200, {"endpoints": list(self.endpoints.values())}
                if body.get("templateId") and body["templateId"] not in self.templates:
                    return 404, {"title": "Not Found", "status": 404, "detail": "template not found"}
                return 201, self._endpoint(body)
            if len(parts) == 3 and parts[1] in ("templates", "serverless"):
                table = self.templates if parts[1] == "templates" else self.endpoints
                if parts[2] not in table:
                    return 404, {"title": "Not Found", "status": 404, "detail": f"{parts[1]} {parts[2]} not found"}
                if method == "GET":
                    return 200, table[parts[2]]
                update = self._template if parts[1] == "templates" else self._endpoint
                return 200, update(body, parts[2])
        return 404, {"title": "Not Found", "status": 404, "detail": "not found"}

    # ---- HTTP --------------------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._serve(self)

            do_POST = do_PATCH = do_DELETE = do_GET

        return Handler

    def _serve(self, request: BaseHTTPRequestHandler) -> None:
        url = urlsplit(request.path)
        raw = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        method = request.command
        operation = contract().match(method, url.path)
        if operation is None:
            self.violations.append(f"{method} {url.path}: no such operation in the contract")
            return self._reply(request, None, 404, {"title": "Not Found", "status": 404, "detail": "no such route"})
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._reply(request, operation, 401, {"title": "Unauthorized", "status": 401,
                                                         "detail": "invalid bearer token"})
        problems = contract().check_request(operation, parse_qs(url.query), dict(request.headers), raw)
        if problems:
            self.violations += [f"{method} {url.path}: {problem}" for problem in problems]
            status = 422 if any(p.startswith("body") for p in problems) else 400
            return self._reply(request, operation, status, {"title": "Invalid request", "status": status,
                                                             "detail": "; ".join(problems), "errors": problems})
        body = json.loads(raw) if raw.strip() else None
        self.requests.append((method, url.path, body))
        status, answer = self._answer(method, url.path, body)
        self._reply(request, operation, status, answer)

    def _reply(self, request: BaseHTTPRequestHandler, operation: Any, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        content_type = "application/json" if status < 400 else "application/problem+json"
        if operation is not None:
            self.violations += [f"{operation.method} {request.path} (fake's answer): {problem}"
                                for problem in contract().check_response(operation, status, content_type, data)]
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)
