"""Keep credentials out of messages: storage_options carry keys, secrets, tokens and passwords."""
from __future__ import annotations

import re
from typing import Any, Iterator

from gpu_proxy.secrets import is_secret_name

REDACTED = "***"
# Shorter values are not credible secrets, and replacing them would mangle every message.
MIN_SECRET_LENGTH = 4
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s]+)@")


def secret_values(storage_options: Any, _under_secret_name: bool = False) -> Iterator[str]:
    """Every string in `storage_options` that sits under a secret-sounding key, at any depth."""
    if isinstance(storage_options, dict):
        for name, value in storage_options.items():
            yield from secret_values(value, _under_secret_name or is_secret_name(str(name)))
    elif isinstance(storage_options, (list, tuple)):
        for value in storage_options:
            yield from secret_values(value, _under_secret_name)
    elif isinstance(storage_options, str) and _under_secret_name and len(storage_options) >= MIN_SECRET_LENGTH:
        yield storage_options


def redact(text: str, storage_options: Any = None) -> str:
    """`text` with every secret of `storage_options`, and any user:password in a URL, replaced."""
    # Longest first, so a secret that contains another secret is not left half-visible.
    for secret in sorted(set(secret_values(storage_options)), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
