"""An image's labels from its registry, without pulling it: the OCI distribution API (``/v2/``).

Reads the manifest (an index is narrowed to ``linux/amd64``, what RunPod runs) and then the image's
config blob (a few KB, where the labels are); no layer is downloaded. Public images only: the
anonymous pull token that Docker Hub, GHCR, Quay and most registries hand out. A private image says
it needs credentials (run the check with ``docker``/``podman`` after ``docker pull`` instead).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import requests

from gpu_proxy.errors import GpuProxyError
from gpu_proxy.http_transport import RetryPolicy, retrying_session

DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_INDEXES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
_MANIFESTS = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json")
_MAX_BYTES = 4 << 20  # a manifest or config blob is KBs; never read a layer by mistake
# Every call is a GET: a 429/5xx or a broken-off answer is tried again (the one transport's policy); a
# registry name that does not resolve or refuses the connection is said at once.
REGISTRY_RETRIES = RetryPolicy(max_retries=3, backoff_s=0.5, max_backoff_s=5.0, connect_errors=False)


class RegistryError(GpuProxyError):
    """The registry could not tell us the image's labels (the message says why)."""


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port]; docker.io for Docker Hub
    repository: str  # library/ubuntu, you/gpu-proxy-node
    reference: str  # a tag or sha256:... digest

    @classmethod
    def parse(cls, image: str) -> "ImageRef":
        """``ubuntu``, ``you/node:2.60``, ``ghcr.io/you/node@sha256:...``, ``127.0.0.1:5000/node:t``."""
        text = image.strip()
        if not text or any(c.isspace() for c in text):
            raise RegistryError(f"{image!r} is not an image name (e.g. ghcr.io/you/gpu-proxy-node:2.60).")
        name, reference = text, "latest"
        if "@" in text:
            name, reference = text.split("@", 1)
        elif ":" in text.rsplit("/", 1)[-1]:
            name, reference = text.rsplit(":", 1)
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, rest
        else:
            registry, repository = DOCKER_HUB, name
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if not re.fullmatch(r"[a-z0-9]+([._/-][a-z0-9]+)*", repository):
            raise RegistryError(f"{image!r}: {repository!r} is not a repository name (lower case, digits, . _ - /).")
        return cls(registry, repository, reference)

    @property
    def base_url(self) -> str:
        host = _DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry
        loopback = host.split(":")[0] in ("127.0.0.1", "localhost")
        return f"{'http' if loopback else 'https'}://{host}"  # plain http only to a registry on this machine

    def __str__(self) -> str:
        separator = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.registry}/{self.repository}{separator}{self.reference}"


class RegistryReader:
    """Reads one image's config over HTTP with the anonymous pull token the registry offers."""

    def __init__(self, ref: ImageRef, timeout_s: float = 20.0) -> None:
        self.ref = ref
        self.timeout_s = timeout_s
        self._session = retrying_session(REGISTRY_RETRIES)
        self._token: str | None = None

    def labels(self) -> dict[str, str]:
        manifest = self._json(f"manifests/{self.ref.reference}", accept=(*_INDEXES, *_MANIFESTS))
        if manifest.get("mediaType") in _INDEXES or "manifests" in manifest:
            chosen = next((m for m in manifest.get("manifests", []) if m.get("platform", {}).get("os") == "linux"
                           and m.get("platform", {}).get("architecture") == "amd64"), None)
            if chosen is None:
                platforms = [f"{m.get('platform', {}).get('os')}/{m.get('platform', {}).get('architecture')}"
                             for m in manifest.get("manifests", [])]
                raise RegistryError(f"{self.ref} has no linux/amd64 image (RunPod's machines); it has: "
                                    f"{', '.join(platforms) or 'none'}.")
            manifest = self._json(f"manifests/{chosen['digest']}", accept=_MANIFESTS)
        digest = (manifest.get("config") or {}).get("digest")
        if not digest:
            raise RegistryError(f"{self.ref}'s manifest names no config blob (mediaType {manifest.get('mediaType')}).")
        body = self._get(f"blobs/{digest}", accept=("application/json", "*/*"))
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RegistryError(f"{self.ref}: the config blob's content does not match its digest {digest}.")
        config = json.loads(body)
        return dict((config.get("config") or {}).get("Labels") or {})

    def _json(self, path: str, accept: tuple[str, ...]) -> dict[str, Any]:
        try:
            return json.loads(self._get(path, accept))
        except ValueError:
            raise RegistryError(f"{self.ref}: the registry's answer to {path} is not JSON.") from None

    def _get(self, path: str, accept: tuple[str, ...]) -> bytes:
        url = f"{self.ref.base_url}/v2/{self.ref.repository}/{path}"
        response = self._send(url, accept)
        if response.status_code == 401 and self._token is None:
            self._token = self._pull_token(response.headers.get("WWW-Authenticate", ""))
            response = self._send(url, accept)
        if response.status_code in (401, 403):
            raise RegistryError(f"{self.ref.registry} refuses an anonymous pull of {self.ref.repository} "
                                f"({response.status_code}): a private image needs credentials. Pull it with "
                                f"docker/podman here and check again, or check a public image.")
        if response.status_code == 404:
            raise RegistryError(f"{self.ref} does not exist in {self.ref.registry} (404): check the name and tag.")
        if response.status_code >= 400:
            raise RegistryError(f"{self.ref.registry} answered {response.status_code} to {path}.")
        with response:
            body = response.raw.read(_MAX_BYTES + 1, decode_content=True)
        if len(body) > _MAX_BYTES:
            raise RegistryError(f"{self.ref}: {path} is larger than a manifest or config can be.")
        return body

    def _send(self, url: str, accept: tuple[str, ...]) -> requests.Response:
        headers = {"Accept": ", ".join(accept)}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:  # a blob is often a redirect to a CDN; requests drops the token when the host changes
            return self._session.get(url, headers=headers, timeout=self.timeout_s, stream=True)
        except requests.RequestException as error:
            raise RegistryError(f"could not reach {self.ref.registry} ({type(error).__name__}).") from None

    def _pull_token(self, challenge: str) -> str:
        """The anonymous token of a ``Bearer realm=...,service=...,scope=...`` challenge."""
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if not challenge.lower().startswith("bearer") or "realm" not in fields:
            raise RegistryError(f"{self.ref.registry} needs credentials ({challenge or 'no challenge'}): pull the "
                                f"image with docker/podman here and check again.")
        params = {key: fields[key] for key in ("service", "scope") if key in fields}
        params.setdefault("scope", f"repository:{self.ref.repository}:pull")
        try:
            answer = self._session.get(fields["realm"], params=params, timeout=self.timeout_s)
        except requests.RequestException as error:
            raise RegistryError(f"could not reach {fields['realm']} for a pull token ({type(error).__name__}).") from None
        if answer.status_code != 200:
            raise RegistryError(f"{self.ref.registry} gave no anonymous pull token for {self.ref.repository} "
                                f"({answer.status_code}): a private image needs credentials.")
        data = answer.json()
        return data.get("token") or data.get("access_token") or ""


def read_labels(image: str, timeout_s: float = 20.0) -> dict[str, str]:
    """The labels of ``image``'s linux/amd64 config, read from its registry. Raises :class:`RegistryError`."""
    return RegistryReader(ImageRef.parse(image), timeout_s).labels()
