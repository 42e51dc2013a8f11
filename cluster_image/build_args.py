"""Print ``--build-arg`` flags for cluster_image/Dockerfile with the versions installed here.

    docker build -f cluster_image/Dockerfile $(python cluster_image/build_args.py) -t gpu-proxy-node .

Ray must be the same version at home and on the cluster; torch, Lightning, Keras and TensorFlow
should be, so that a model pickled here loads there. A package not installed here keeps the
Dockerfile's default. ``GPU_PROXY_SOURCE`` is the digest of the gpu-proxy code being built (this
checkout), which the image is labelled with; ``gpu-proxy image check`` compares it with home's.
"""
from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

PACKAGES = {"TORCH_VERSION": "torch", "LIGHTNING_VERSION": "lightning", "KERAS_VERSION": "keras",
            "TENSORFLOW_VERSION": ("tensorflow", "tensorflow-cpu"), "RAY_VERSION": "ray",
            "CLOUDPICKLE_VERSION": "cloudpickle", "GPU_PROXY_VERSION": "gpu-proxy"}
ROOT = Path(__file__).resolve().parents[1]  # the project the image is built from


def installed_version(names: "str | tuple[str, ...]") -> str | None:
    for name in (names,) if isinstance(names, str) else names:
        try:
            return metadata.version(name).split("+")[0]  # 2.13.0+cpu -> 2.13.0 (the image picks CUDA)
        except metadata.PackageNotFoundError:
            continue
    return None


def build_args() -> dict[str, str]:
    args = {"PYTHON_VERSION": f"{sys.version_info.major}.{sys.version_info.minor}"}
    for arg, names in PACKAGES.items():
        version = installed_version(names)
        if version:
            args[arg] = version
    if "TENSORFLOW_VERSION" not in args:
        args["INSTALL_TENSORFLOW"] = "0"
    sys.path.insert(0, str(ROOT))  # the checkout's own code says how its digest is made
    try:
        from gpu_proxy.versions import source_digest
    finally:
        sys.path.remove(str(ROOT))
    args["GPU_PROXY_SOURCE"] = source_digest(ROOT)
    return args


if __name__ == "__main__":
    print(" ".join(f"--build-arg {name}={value}" for name, value in build_args().items()))
