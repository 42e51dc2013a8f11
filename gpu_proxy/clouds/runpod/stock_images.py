"""Which RunPod stock PyTorch image a cluster without ``image=`` starts from.

RunPod's official templates (``GET /v2/catalog/templates``) include ``runpod/pytorch:<tag>`` images
with CUDA, Python, torch and sshd (their start script writes ``PUBLIC_KEY`` to authorized_keys and
runs sshd). The table maps home's torch (major.minor) to the tag that ships it, so the bootstrap
does not download torch again. Home's torch newer than every entry: the newest entry, and the
bootstrap installs home's torch over it (slower: pass ``image=`` for a fast start).

The entries (from runpod/containers, ``official-templates/pytorch``: its README and
``docker-bake.hcl``) are all CUDA 12.8.1 on Ubuntu 24.04, where torch lives in ``python3`` = 3.12 and
Python 3.9 to 3.13 are there with pip (:mod:`.node_install` takes home's minor). Never chosen:
``cu13*`` tags (RunPod's pods do not offer CUDA 13 yet) and the ``1.0.x`` ``ubuntu2204`` variants,
whose ``python3`` is 3.10 while torch is installed for 3.12.

The table is checked against the catalog RunPod serves before any pod starts: an entry RunPod no
longer lists is not used. A torch the listed entries lack is taken from the other ``runpod/pytorch``
images the catalog lists (among several tags of one torch: CUDA 12.8.1 and Ubuntu 24.04 first, then
the newest tag), chosen the same way whatever the catalog's order. Home's torch found in neither:
the newest torch there is.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from gpu_proxy.clouds.runpod.models import Template
from gpu_proxy.errors import ConfigurationError

# torch major.minor -> the stock image that ships it (tags as RunPod publishes them).
STOCK_PYTORCH: dict[str, str] = {
    "2.9": "runpod/pytorch:1.0.3-cu1281-torch291-ubuntu2404",
    "2.8": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
    "2.7": "runpod/pytorch:1.0.2-cu1281-torch271-ubuntu2404",
    "2.6": "runpod/pytorch:1.0.2-cu1281-torch260-ubuntu2404",
}
PREFIX = "runpod/pytorch:"
_TAG_TORCH = re.compile(r"torch(\d)(\d+)(\d)\b")  # torch280 -> 2.8.0; torch2100 would be 2.10.0
_OLD_TAG = re.compile(r"^runpod/pytorch:(\d+)\.(\d+)\.\d+-py")  # the older naming: torch's version first
_NEW_TAG = re.compile(r"^runpod/pytorch:(\d+(?:\.\d+)*)-")  # 1.0.2-cu1281-...: the template's own version
_CUDA_13 = re.compile(r"-(cu13\d*|cuda13[.\d]*)(-|$)")


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _torch_of(image: str) -> str | None:
    found = _TAG_TORCH.search(image) or _OLD_TAG.search(image)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def usable(image: str) -> bool:
    """A ``runpod/pytorch`` image a pod can start from and the bootstrap can use."""
    if not image.startswith(PREFIX) or _torch_of(image) is None or _CUDA_13.search(image):
        return False
    return not (_TAG_TORCH.search(image) and "ubuntu2204" in image)  # the 1.0.x Ubuntu 22.04 variants


def _preference(image: str) -> tuple:
    """Larger is better, among images of one torch minor."""
    template = _NEW_TAG.match(image)
    version = tuple(int(p) for p in template.group(1).split(".")) if template and _TAG_TORCH.search(image) else ()
    return ("-cu1281-" in image, "ubuntu2404" in image, bool(version), version, image)


def best_listed(images: Iterable[str]) -> dict[str, str]:
    """torch major.minor -> the preferred usable image of those in ``images`` (deterministic: sorted)."""
    table: dict[str, str] = {}
    for image in sorted(set(images), key=_preference, reverse=True):
        if usable(image):
            table.setdefault(_torch_of(image), image)
    return table


def choose_stock_image(torch_version: str | None, catalog: Sequence[Template]) -> str:
    """The stock image for home's torch (None: home has no torch), checked against ``catalog``."""
    listed = {template.image for template in catalog if not template.serverless}
    table = {**best_listed(listed), **{minor: image for minor, image in STOCK_PYTORCH.items() if image in listed}}
    if not table:
        raise ConfigurationError(
            "RunPod's template catalog lists no runpod/pytorch image to start the pods from: pass "
            "image='registry/name:tag' (built from cluster_image/Dockerfile) or set GPU_PROXY_RUNPOD_IMAGE.")
    if torch_version:
        minor = ".".join(str(part) for part in _key(torch_version))
        if minor in table:
            return table[minor]
    return table[max(table, key=_key)]
