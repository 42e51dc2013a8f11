"""Which RunPod stock PyTorch image a cluster without ``image=`` starts from.

RunPod's official templates (``GET /v2/catalog/templates``) include ``runpod/pytorch:<tag>`` images
with CUDA, Python, torch and sshd (their start script writes ``PUBLIC_KEY`` to authorized_keys and
runs sshd). The table maps home's torch (major.minor) to the tag that ships it, so the bootstrap
does not download torch again. Home's torch newer than every entry: the newest entry, and the
bootstrap installs home's torch over it (slower: pass ``image=`` for a fast start).

The table is checked against the catalog RunPod serves before any pod starts: an entry RunPod no
longer lists is not used; the newest ``runpod/pytorch`` image it does list is.
"""
from __future__ import annotations

import re
from typing import Sequence

from gpu_proxy.clouds.runpod.models import Template
from gpu_proxy.errors import ConfigurationError

# torch major.minor -> the stock image that ships it (tags as RunPod publishes them).
STOCK_PYTORCH: dict[str, str] = {
    "2.8": "runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404",
}
_TAG_TORCH = re.compile(r"torch(\d)(\d+)(\d)\b")  # torch280 -> 2.8.0; torch2100 would be 2.10.0
_OLD_TAG = re.compile(r"^runpod/pytorch:(\d+)\.(\d+)\.\d+-py")  # the older naming: torch's version first


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _torch_of(image: str) -> str | None:
    found = _TAG_TORCH.search(image) or _OLD_TAG.search(image)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def choose_stock_image(torch_version: str | None, catalog: Sequence[Template]) -> str:
    """The stock image for home's torch (None: home has no torch), checked against ``catalog``."""
    listed = {template.image for template in catalog if not template.serverless}
    table = {minor: image for minor, image in STOCK_PYTORCH.items() if image in listed}
    if not table:  # none of ours is listed any more: the newest runpod/pytorch image that is
        table = {torch: image for image in listed if image.startswith("runpod/pytorch:")
                 and (torch := _torch_of(image))}
    if not table:
        raise ConfigurationError(
            "RunPod's template catalog lists no runpod/pytorch image to start the pods from: pass "
            "image='registry/name:tag' (built from cluster_image/Dockerfile) or set GPU_PROXY_RUNPOD_IMAGE.")
    if torch_version:
        minor = ".".join(str(part) for part in _key(torch_version))
        if minor in table:
            return table[minor]
    return table[max(table, key=_key)]
