"""Check HTTP requests and responses against an OpenAPI 3.1 document (RunPod's REST v2).

Small on purpose: path templates, path/query parameters (form style, comma-separated arrays),
the bearer header, JSON bodies. Schemas are checked with openapi-schema-validator's OAS 3.1
validator, with ``$ref`` resolved against the whole document.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from openapi_schema_validator import OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# A copy of RunPod's REST v2 OpenAPI document (from shared/runpod/openapi-v2.json), kept beside the fake.
DOCUMENT = Path(__file__).with_name("runpod-openapi-v2.json")
_BASE = "urn:runpod-openapi-v2"


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    spec: Mapping[str, Any]
    path_params: Mapping[str, str]


class Contract:
    def __init__(self, document: "str | Path" = DOCUMENT) -> None:
        self.document = json.loads(Path(document).read_text())
        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(_BASE, resource)
        self._validators: dict[str, OAS31Validator] = {}
        self._paths = []
        for template in self.document["paths"]:
            # Literal segments must win over parameters (/v2/registries/delegations vs /v2/registries/{id}).
            pattern = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
            self._paths.append((template.count("{"), template, re.compile(pattern)))
        self._paths.sort()

    def _deref(self, item: Mapping[str, Any]) -> Mapping[str, Any]:
        while "$ref" in item:
            node: Any = self.document
            for part in item["$ref"].lstrip("#/").split("/"):
                node = node[part]
            item = node
        return item

    def _validator(self, pointer: str) -> OAS31Validator:
        if pointer not in self._validators:
            self._validators[pointer] = OAS31Validator({"$ref": f"{_BASE}#{pointer}"}, registry=self._registry)
        return self._validators[pointer]

    def _errors(self, pointer: str, value: Any, where: str) -> list[str]:
        return [f"{where}{'.' + '.'.join(map(str, e.absolute_path)) if e.absolute_path else ''}: {e.message}"
                for e in self._validator(pointer).iter_errors(value)]

    def match(self, method: str, path: str) -> Operation | None:
        for _, template, pattern in self._paths:
            found = pattern.match(path)
            if found and method.lower() in self.document["paths"][template]:
                return Operation(method.upper(), template, self.document["paths"][template][method.lower()],
                                 found.groupdict())
        return None

    def _parameters(self, operation: Operation) -> list[tuple[str, Mapping[str, Any]]]:
        """(JSON pointer of the parameter, the parameter) for the operation and its path item."""
        found = []
        item_pointer = "/paths/" + operation.template.replace("~", "~0").replace("/", "~1")
        for owner, pointer in ((self.document["paths"][operation.template], item_pointer),
                               (operation.spec, f"{item_pointer}/{operation.method.lower()}")):
            for index, parameter in enumerate(owner.get("parameters", [])):
                if "$ref" in parameter:
                    found.append((parameter["$ref"].lstrip("#"), self._deref(parameter)))
                else:
                    found.append((f"{pointer}/parameters/{index}", parameter))
        return found

    def check_request(self, operation: Operation, query: Mapping[str, list[str]], headers: Mapping[str, str],
                      body: bytes) -> list[str]:
        errors = []
        security = operation.spec.get("security", self.document.get("security", []))
        if security and not headers.get("Authorization", "").startswith("Bearer "):
            errors.append("header Authorization: a bearer token is required")
        known = set()
        for pointer, parameter in self._parameters(operation):
            name, place = parameter["name"], parameter["in"]
            known.add((place, name))
            if place == "path":
                raw = operation.path_params.get(name)
            elif place == "query":
                raw = query[name][-1] if name in query else None
            else:
                continue
            if raw is None:
                if parameter.get("required"):
                    errors.append(f"{place} parameter {name} is required")
                continue
            errors += self._errors(f"{pointer}/schema", self._coerce(raw, self._deref(parameter["schema"])),
                                   f"{place} parameter {name}")
        for name in query:
            if ("query", name) not in known:
                errors.append(f"query parameter {name} is not in the contract")
        request_body = self._deref(operation.spec["requestBody"]) if "requestBody" in operation.spec else None
        if request_body is None:
            if body.strip():
                errors.append("body: this operation takes no body")
            return errors
        if not body.strip():
            if request_body.get("required"):
                errors.append("body: required")
            return errors
        content_type = headers.get("Content-Type", "").split(";")[0].strip()
        if content_type not in request_body["content"]:
            return errors + [f"Content-Type {content_type!r} is not one of {list(request_body['content'])}"]
        try:
            value = json.loads(body)
        except ValueError as error:
            return errors + [f"body: not JSON ({error})"]
        return errors + self._errors(self._content_pointer(operation, None, content_type), value, "body")

    def _content_pointer(self, operation: Operation, status: str | None, content_type: str) -> str:
        item = "/paths/" + operation.template.replace("~", "~0").replace("/", "~1") + "/" + operation.method.lower()
        if status is None:
            base = operation.spec["requestBody"]
            pointer = base["$ref"].lstrip("#") if "$ref" in base else f"{item}/requestBody"
        else:
            base = operation.spec["responses"][status]
            pointer = base["$ref"].lstrip("#") if "$ref" in base else f"{item}/responses/{status}"
        return f"{pointer}/content/{content_type.replace('/', '~1')}/schema"

    @staticmethod
    def _coerce(raw: str, schema: Mapping[str, Any]) -> Any:
        """A query string value as the schema's type (form style, explode=false: arrays are a,b,c)."""
        kind = schema.get("type")
        if kind == "array":
            return raw.split(",") if raw else []
        if kind == "integer":
            return int(raw) if re.fullmatch(r"-?\d+", raw) else raw
        if kind == "number":
            try:
                return float(raw)
            except ValueError:
                return raw
        if kind == "boolean":
            return {"true": True, "false": False}.get(raw, raw)
        return raw

    def check_response(self, operation: Operation, status: int, content_type: str, body: bytes) -> list[str]:
        responses = operation.spec["responses"]
        key = str(status) if str(status) in responses else "default" if "default" in responses else None
        if key is None:
            return [f"status {status} is not a documented response of {operation.method} {operation.template}"]
        response = self._deref(responses[key])
        content = response.get("content")
        if not content:
            return [] if not body.strip() else [f"status {status} must have no body"]
        content_type = content_type.split(";")[0].strip()
        if content_type not in content:
            return [f"response {status}: Content-Type {content_type!r} is not one of {list(content)}"]
        return self._errors(self._content_pointer(operation, key, content_type), json.loads(body),
                            f"response {status}")
