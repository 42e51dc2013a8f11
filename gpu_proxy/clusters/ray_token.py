"""Find the Ray auth token where Ray itself looks for it; never print it."""
from __future__ import annotations

import os
from pathlib import Path


def find_ray_token() -> str | None:
    """``RAY_AUTH_TOKEN``, else the file at ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text().strip() or None
    return None
