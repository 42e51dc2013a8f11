"""The version labels of the node image (``cluster_image/Dockerfile``), and their check at build time.

A label is what the build was asked for (a build argument); the Dockerfile runs ``python -m
gpu_proxy.clouds.runpod.image.labels verify ...`` after installing, which fails the build when the
installed versions are not those arguments. So a label of an image that built is what it runs, and
it can be read from the registry without pulling the image. ``gpu-proxy.source`` names the gpu-proxy
code copied in (:func:`~gpu_proxy.versions.source_digest`), which a version number
alone does not (every checkout of 0.1.0 says 0.1.0).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping, Sequence

from gpu_proxy.versions import PACKAGES, home_versions, public_version, source_digest

# compared name -> label (the names of versions.PACKAGES, with Python's major.minor)
LABELS: dict[str, str] = {"python": "gpu-proxy.python", "gpu-proxy": "gpu-proxy.version", "ray": "gpu-proxy.ray",
                          "cloudpickle": "gpu-proxy.cloudpickle", "torch": "gpu-proxy.torch",
                          "lightning": "gpu-proxy.lightning", "keras": "gpu-proxy.keras",
                          "tensorflow": "gpu-proxy.tensorflow"}
SOURCE_LABEL = "gpu-proxy.source"
TENSORFLOW_INSTALLED_LABEL = "gpu-proxy.install-tensorflow"  # "0": the tensorflow label is only the default
SCHEMA_LABEL = "gpu-proxy.labels"  # "2": these labels were checked against the installed versions at build
SCHEMA = "2"
assert set(LABELS) == {"python", *PACKAGES}, "a compared package has no label"


def versions_from_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The versions an image's labels state (compared names only; an absent or empty label: not stated)."""
    found = {name: labels[label] for name, label in LABELS.items() if labels.get(label)}
    if labels.get(TENSORFLOW_INSTALLED_LABEL) == "0":
        found.pop("tensorflow", None)
    return found


def built_with_checked_labels(labels: Mapping[str, str]) -> bool:
    return labels.get(SCHEMA_LABEL) == SCHEMA


def verify(expected: Mapping[str, str], source: Path | None, source_expected: str = "") -> list[str]:
    """What is wrong about ``expected`` (name -> version; empty: must be absent) in this Python; [] when true."""
    installed = home_versions()
    problems = []
    for name, version in expected.items():
        if name not in LABELS:
            problems.append(f"{name}: not a compared package (one of {', '.join(LABELS)})")
        elif not version and name in installed:
            problems.append(f"{name}: labelled absent but {installed[name]} is installed")
        elif version and public_version(installed.get(name, "")) != public_version(version):
            problems.append(f"{name}: labelled {version} but {installed.get(name) or 'nothing'} is installed")
    if source_expected and source is not None and source_digest(source) != source_expected:
        problems.append(f"gpu-proxy source: labelled {source_expected} but the copied tree is {source_digest(source)}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``verify [--source DIR DIGEST] name=version ...``: exit 1 with every problem when a label would lie."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args.pop(0) != "verify" or (args[:1] == ["--source"] and len(args) < 3):
        print("usage: python -m gpu_proxy.clouds.runpod.image.labels verify [--source DIR DIGEST] name=version ...",
              file=sys.stderr)
        return 2
    source, digest = None, ""
    if args[:1] == ["--source"]:
        source, digest, args = Path(args[1]), args[2], args[3:]
    expected = dict(arg.partition("=")[::2] for arg in args)
    problems = verify(expected, source, digest)
    for problem in problems:
        print(f"gpu-proxy image labels: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
