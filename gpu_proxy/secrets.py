"""Secrets that travel to a run's workers without ever entering a pickle.

A run ships as one pickle (the payload; on a Ray Job also ``run.pkl`` in the job's package, which
the cluster keeps). Credentials the user passes (``storage_options={"secret": ...}``) must reach
the workers but must not be in that pickle. :func:`conceal` wraps each such value in
:class:`Concealed`, a ``str`` that works as the value everywhere at home but pickles as a reference.
:func:`gpu_proxy.shipping.dumps` collects the values the payload referred to into the run's
``RunSpec.secrets``, which travel beside the pickle (in memory on the embedded cluster; on a Ray
Job through the cluster's token-checked key-value store, deleted by the driver as it reads them) and
are installed in each worker before the payload is unpickled there.
"""
from __future__ import annotations

import contextlib
import threading
import uuid
from typing import Any, Iterator

from gpu_proxy.errors import GpuProxyError

# Keys whose values are credentials, as fsspec implementations name them (s3fs key/secret/token,
# gcsfs token, adlfs account_key/sas_token, sshfs password...).
_SECRET_KEY_WORDS = ("key", "secret", "token", "password", "passwd", "passphrase", "credential",
                     "auth", "sas", "signature", "private")

_known: dict[str, str] = {}  # ref -> value, for the values this process may reveal
_known_lock = threading.Lock()
_collecting = threading.local()


class Concealed(str):
    """A secret string: itself at home, a reference in a pickle, itself again in the run's workers."""

    ref: str

    def __new__(cls, value: str, ref: str | None = None) -> "Concealed":
        obj = super().__new__(cls, value)
        obj.ref = ref or uuid.uuid4().hex
        if ref is None:  # a new secret at home: this process may reveal it later (a result coming back)
            with _known_lock:
                _known[obj.ref] = str.__str__(obj)
        return obj

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        found = getattr(_collecting, "found", None)
        if found is not None:
            found[self.ref] = str.__str__(self)
        return _reveal, (self.ref,)

    def __repr__(self) -> str:  # never echoed
        return "'***'"

    def __copy__(self) -> "Concealed":
        return self

    def __deepcopy__(self, memo: dict) -> "Concealed":
        return self


def _reveal(ref: str) -> Concealed:
    with _known_lock:
        value = _known.get(ref)
    if value is None:
        raise GpuProxyError(
            "A secret of this run (a credential from storage_options) is not available in this process: "
            "it travels only with the run, not inside pickles saved elsewhere.")
    return Concealed(value, ref)


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_KEY_WORDS)


def conceal(options: Any, _under_secret_name: bool = False) -> Any:
    """``options`` (e.g. fsspec ``storage_options``) with each string under a secret-sounding key,
    at any depth, wrapped in :class:`Concealed`."""
    if isinstance(options, dict):
        return {name: conceal(value, _under_secret_name or is_secret_name(str(name)))
                for name, value in options.items()}
    if isinstance(options, (list, tuple)):
        return type(options)(conceal(value, _under_secret_name) for value in options)
    if isinstance(options, str) and _under_secret_name and not isinstance(options, Concealed):
        return Concealed(options)
    return options


def references(options: Any) -> dict[str, str]:
    """The ``{ref: value}`` of every :class:`Concealed` inside ``options`` (what must travel beside it)."""
    if isinstance(options, Concealed):
        return {options.ref: str.__str__(options)}
    if isinstance(options, dict):
        options = list(options.values())
    if isinstance(options, (list, tuple)):
        found: dict[str, str] = {}
        for value in options:
            found.update(references(value))
        return found
    return {}


@contextlib.contextmanager
def collecting() -> Iterator[dict[str, str]]:
    """Within the block, every :class:`Concealed` pickled on this thread is noted in the dict yielded."""
    previous = getattr(_collecting, "found", None)
    found: dict[str, str] = {}
    _collecting.found = found
    try:
        yield found
    finally:
        _collecting.found = previous
        if previous is not None:
            previous.update(found)


def install(secrets: dict[str, str]) -> dict[str, str]:
    """Make a run's secrets resolvable in this process; returns those that were new here."""
    with _known_lock:
        added = {ref: value for ref, value in secrets.items() if ref not in _known}
        _known.update(added)
    return added


@contextlib.contextmanager
def installed(secrets: dict[str, str]) -> Iterator[None]:
    """Make a run's secrets resolvable in this (worker) process for the block; forget them after."""
    added = install(secrets)
    try:
        yield
    finally:
        with _known_lock:
            for ref in added:
                _known.pop(ref, None)
