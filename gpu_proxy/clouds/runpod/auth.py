"""The RunPod API key: where it is read from, and the holder that keeps it out of reprs and pickles."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

from gpu_proxy.errors import ConfigurationError

API_KEY_ENV = "RUNPOD_API_KEY"
CONFIG_FILE = Path("~/.runpod/config.toml")  # where `runpod config` (the SDK's CLI) keeps the key


def load_api_key(api_key: str | None = None, profile: str = "default",
                 config_file: "str | Path | None" = None) -> str:
    """The key given, else ``$RUNPOD_API_KEY``, else ``[profile] api_key`` in ``~/.runpod/config.toml``."""
    if api_key:
        return api_key.strip()
    if os.environ.get(API_KEY_ENV, "").strip():
        return os.environ[API_KEY_ENV].strip()
    path = Path(config_file or CONFIG_FILE).expanduser()
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError:
            # The parser's message may quote the file's content, which holds the key: say where only.
            raise ConfigurationError(f"{path} is not valid TOML: fix it with `runpod config` or set "
                                     f"{API_KEY_ENV}.") from None
        key = data.get(profile, {}).get("api_key") if isinstance(data.get(profile), dict) else None
        if key and str(key).strip():
            return str(key).strip()
    raise ConfigurationError(
        f"No RunPod API key: set {API_KEY_ENV} (create a key at https://www.runpod.io/console/user/settings) "
        f"or run `runpod config` to store it in {CONFIG_FILE}.")


class APIKey:
    """Holds the key so that printing an object's attributes (a debugger, vars()) shows no secret."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<RunPod API key>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("the RunPod API key cannot be pickled")
