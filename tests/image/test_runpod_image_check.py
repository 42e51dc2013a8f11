"""`gpu-proxy image check IMAGE`: an image's versions against home's, without pulling it.

The registry is a small OCI distribution server on loopback (anonymous pull tokens, an index of two
platforms, the config blob behind a redirect, as Docker Hub and GHCR serve them); the container engine
is a stand-in `docker` whose `run` executes the probe with this machine's Python and a chosen set of
installed versions. What is not exercised: a real registry's TLS and a real engine's containers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpu_proxy.clouds.runpod.image.check import check_image
from gpu_proxy.clouds.runpod.image.labels import LABELS, SCHEMA, SCHEMA_LABEL, SOURCE_LABEL
from gpu_proxy.clouds.runpod.image.registry import ImageRef, RegistryError, read_labels
from gpu_proxy.versions import home_versions

ROOT = Path(__file__).resolve().parents[2]
HOME = home_versions()
HOME_SOURCE = "0123456789abcdef"


def home_labels(**changes: str) -> dict[str, str]:
    """The labels cluster_image/Dockerfile gives an image built with this machine's versions."""
    labels = {LABELS[name]: version for name, version in HOME.items() if name in LABELS}
    labels.update({SCHEMA_LABEL: SCHEMA, SOURCE_LABEL: HOME_SOURCE, "org.opencontainers.image.title": "gpu-proxy node"})
    labels.update({LABELS.get(name, name): value for name, value in changes.items()})
    return labels


# ---- a registry on loopback --------------------------------------------------------------------------

class Registry:
    """OCI distribution API, read-only: ``add(repo, tag, labels)`` publishes an image's index, manifest, config."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.private: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (path, Authorization)
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                registry.requests.append((self.path, self.headers.get("Authorization", "")))
                registry.answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # localhost too, where that is 127.0.0.1
        self.host = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _blob(self, content: dict) -> tuple[str, bytes]:
        body = json.dumps(content).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.blobs[digest] = body
        return digest, body

    def add(self, repository: str, tag: str, labels: dict[str, str]) -> str:
        config_digest, config = self._blob({"architecture": "amd64", "os": "linux", "config": {"Labels": labels}})
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                               "size": len(config)}, "layers": []}
        digest, body = self._blob(manifest)
        self.manifests[(repository, digest)] = ("application/vnd.oci.image.manifest.v1+json", body)
        arm_digest, _ = self._blob({"schemaVersion": 2, "other": "arm64"})
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            {"digest": arm_digest, "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": digest, "platform": {"os": "linux", "architecture": "amd64"}}]}
        self.manifests[(repository, tag)] = ("application/vnd.oci.image.index.v1+json", json.dumps(index).encode())
        return f"{self.host}/{repository}:{tag}"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        if path == "/token":
            scope = handler.path.partition("scope=")[2]
            if any(repo.replace("/", "%2F") in scope for repo in self.private):
                return self._send(handler, 401, b'{"errors": [{"code": "DENIED"}]}')
            return self._send(handler, 200, b'{"token": "anonymous-pull"}')
        if path.startswith("/cdn/"):  # where a blob redirect lands: no token expected (another host, normally)
            return self._send(handler, 200, self.blobs[path[len("/cdn/"):]])
        repository = path[len("/v2/"):].split("/manifests/")[0].split("/blobs/")[0]
        if handler.headers.get("Authorization") != "Bearer anonymous-pull":
            challenge = (f'Bearer realm="http://{self.host}/token",service="fake-registry",'
                         f'scope="repository:{repository}:pull"')
            return self._send(handler, 401, b"{}", {"WWW-Authenticate": challenge})
        repository, _, rest = path[len("/v2/"):].partition("/manifests/")
        if rest:
            if (repository, rest) not in self.manifests:
                return self._send(handler, 404, b'{"errors": [{"code": "MANIFEST_UNKNOWN"}]}')
            media_type, body = self.manifests[(repository, rest)]
            return self._send(handler, 200, body, {"Content-Type": media_type})
        repository, _, digest = path[len("/v2/"):].partition("/blobs/")
        if digest in self.blobs:
            # To another host name, as registries send blobs to their CDN (the token must not follow).
            cdn = f"http://localhost:{self.server.server_port}/cdn/{digest}"
            return self._send(handler, 307, b"", {"Location": cdn})
        return self._send(handler, 404, b"{}")

    @staticmethod
    def _send(handler, status: int, body: bytes, headers: dict | None = None) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def registry():
    registry = Registry()
    yield registry
    registry.close()


def test_image_names_parse_as_docker_does():
    assert ImageRef.parse("ubuntu") == ImageRef("docker.io", "library/ubuntu", "latest")
    assert ImageRef.parse("you/node:2.60") == ImageRef("docker.io", "you/node", "2.60")
    assert ImageRef.parse("ghcr.io/you/node@sha256:ab") == ImageRef("ghcr.io", "you/node", "sha256:ab")
    assert ImageRef.parse("localhost:5000/node").base_url == "http://localhost:5000"
    assert ImageRef.parse("ubuntu").base_url == "https://registry-1.docker.io"
    assert ImageRef.parse("ghcr.io/you/node:1").base_url == "https://ghcr.io"  # https to any other registry
    with pytest.raises(RegistryError, match="not a repository name"):
        ImageRef.parse("ghcr.io/You/Node:1")


def test_labels_are_read_from_the_registry_without_pulling_a_layer(registry):
    image = registry.add("team/node", "ok", home_labels())
    assert read_labels(image)[LABELS["ray"]] == HOME["ray"]
    paths = [path for path, _ in registry.requests]
    assert "/token" in " ".join(paths) and not any("layer" in path for path in paths)
    assert all(auth == "" for path, auth in registry.requests if path.startswith("/cdn/"))  # the token stays with the registry

    report = check_image(image, engines=(), home=HOME, home_source=HOME_SOURCE)
    assert report.exit_code == 0, report.text()
    assert "matches home" in report.text() and "read from its registry" in report.text()


def test_an_image_with_other_versions_is_refused_naming_both(registry):
    image = registry.add("team/node", "skewed", home_labels(ray="2.59.0", python="3.12"))
    report = check_image(image, engines=(), home=HOME, home_source=HOME_SOURCE)
    text = report.text()
    assert report.exit_code == 1 and report.names("differs") == ["python", "ray"]
    assert "2.59.0" in text and HOME["ray"] in text and "3.12" in text and "build_args.py" in text
    other_code = registry.add("team/node", "other-code", home_labels(**{SOURCE_LABEL: "fedcba9876543210"}))
    assert check_image(other_code, engines=(), home=HOME, home_source=HOME_SOURCE).names("differs") == [
        "gpu-proxy source"]


def test_what_cannot_be_checked_is_said_not_passed(registry):
    stock = registry.add("runpod/pytorch", "plain", {"maintainer": "someone"})
    report = check_image(stock, engines=(), home=HOME, home_source=HOME_SOURCE)
    assert report.exit_code == 3 and "not built from cluster_image/Dockerfile" in report.text()
    # An older image without a keras label: keras unknown, the rest compared, and the labels flagged unchecked.
    old = {key: value for key, value in home_labels().items() if key not in (SCHEMA_LABEL, LABELS["keras"])}
    report = check_image(registry.add("team/node", "old", old), engines=(), home=HOME, home_source=HOME_SOURCE)
    assert report.names("not checked") == (["keras"] if "keras" in HOME else []) and "older" in report.text()
    registry.private.add("team/secret")
    registry.add("team/secret", "1", home_labels())
    report = check_image(f"{registry.host}/team/secret:1", engines=(), home=HOME)
    assert report.exit_code == 3 and "needs credentials" in report.text()
    report = check_image(f"{registry.host}/team/node:nope", engines=(), home=HOME)
    assert report.exit_code == 3 and "does not exist" in report.text()


# ---- a container engine ------------------------------------------------------------------------------

FAKE_DOCKER = f"""#!{sys.executable}
import json, os, subprocess, sys
images = json.load(open(os.environ["FAKE_DOCKER_IMAGES"]))
args = sys.argv[1:]
if args[:2] == ["image", "inspect"]:
    if args[-1] not in images:
        sys.exit("Error: No such image: " + args[-1])
    print(json.dumps(images[args[-1]]["labels"]))
    sys.exit(0)
assert args[0] == "run" and "--pull=never" in args and "--network=none" in args, args
at = args.index("--entrypoint")
shell, image, rest = args[at + 1], args[at + 2], args[at + 3:]
env = dict(os.environ, PYTHONPATH=images[image]["pythonpath"], PATH="{Path(sys.executable).parent}:/usr/bin:/bin")
sys.exit(subprocess.run([shell, *rest], env=env).returncode)
"""


@pytest.fixture
def engine(tmp_path, monkeypatch):
    """A `docker` on PATH that has the images written to ``images`` (labels, and versions shadowing ours)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    images: dict[str, dict] = {}

    def add(name: str, labels: dict[str, str], **installed: str) -> str:
        site = tmp_path / name.replace("/", "_").replace(":", "_")
        for dist, version in installed.items():  # found before ours on sys.path: the image's versions
            info = site / f"{dist}-{version}.dist-info"
            info.mkdir(parents=True)
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        images[name] = {"labels": labels, "pythonpath": str(site)}
        (tmp_path / "images.json").write_text(json.dumps(images))
        return name

    (tmp_path / "images.json").write_text("{}")
    monkeypatch.setenv("FAKE_DOCKER_IMAGES", str(tmp_path / "images.json"))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    add.bin_dir = bin_dir  # type: ignore[attr-defined]
    return add


def test_an_image_the_engine_has_is_probed_inside_for_what_it_really_runs(engine):
    # Labels that claim home's versions, yet Ray 2.59.0 is what is installed: the probe is believed.
    image = engine("gpu-proxy-node:local", home_labels(), ray="2.59.0")
    report = check_image(image, engines=("docker",), home=HOME, home_source=HOME_SOURCE)
    assert report.source == "running Python inside the image with docker"
    assert report.exit_code == 1 and report.names("differs") == ["ray"], report.text()
    assert check_image(engine("good:1", home_labels()), engines=("docker",), home=HOME,
                       home_source=HOME_SOURCE).exit_code == 0


def test_an_image_the_engine_lacks_falls_back_to_the_registry(engine, registry):
    image = registry.add("team/node", "remote", home_labels())
    report = check_image(image, engines=("docker",), home=HOME, home_source=HOME_SOURCE)
    assert report.exit_code == 0 and "No such image" in report.text() and "registry" in report.source


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client on this machine")
def test_a_docker_client_without_a_daemon_is_said_and_skipped(registry, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    image = registry.add("team/node", "nodaemon", home_labels())
    report = check_image(image, engines=("docker",), home=HOME, home_source=HOME_SOURCE)
    assert report.exit_code == 0 and "Cannot connect to the Docker daemon" in report.text()


def test_gpu_proxy_image_check_prints_the_table_and_exits_by_the_answer(registry, capsys, monkeypatch):
    import gpu_proxy.clouds.runpod.image.check as check
    from gpu_proxy.cli import main

    monkeypatch.setattr(check, "project_root", lambda: None)  # as a pip-installed home: no source to compare
    good = registry.add("team/node", "cli", home_labels())
    bad = registry.add("team/node", "cli-bad", home_labels(ray="2.59.0"))
    for image, code in ((good, 0), (bad, 1)):
        assert main(["image", "check", image, "--no-engine"]) == code
        out = capsys.readouterr().out
        assert "ray  " in out and HOME["ray"] in out and ("matches home" in out) == (code == 0)


# ---- the labels are true: the build checks them ------------------------------------------------------

def test_the_label_check_passes_true_labels_and_names_a_lie(capsys):
    from gpu_proxy.clouds.runpod.image import labels

    command = [sys.executable, "-m", "gpu_proxy.clouds.runpod.image.labels", "verify", "--source", str(ROOT),
               __import__("gpu_proxy.versions", fromlist=["x"]).source_digest(ROOT),
               *(f"{name}={version}" for name, version in HOME.items())]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    true = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)  # as the Dockerfile runs it
    assert true.returncode == 0, true.stderr
    assert labels.main([*command[3:], "ray=2.59.0", "jax=", "tensorflow="]) == 1
    lies = capsys.readouterr().err
    assert f"ray: labelled 2.59.0 but {HOME['ray']} is installed" in lies and "jax: not a compared package" in lies
    assert ("tensorflow: labelled absent" in lies) == ("tensorflow" in HOME)
    assert labels.main([*command[3:6], "f" * 16]) == 1 and "gpu-proxy source: labelled ffff" in capsys.readouterr().err


def test_the_dockerfile_labels_and_checks_every_compared_version():
    text = (ROOT / "cluster_image" / "Dockerfile").read_text()
    verify = text[text.index("image.labels verify"):text.index("LABEL org.opencontainers")]
    for name, label in LABELS.items():
        assert f'{label}="${{' in text, f"no {label} label"
        assert f'"{name}=' in verify, f"{name} is labelled but not checked at build"
    assert f'{SCHEMA_LABEL}="{SCHEMA}"' in text and f'{SOURCE_LABEL}="${{GPU_PROXY_SOURCE}}"' in text
