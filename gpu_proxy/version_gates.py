"""What gpu-proxy needs installed: the versions of the libraries whose private parts it uses, and its extras.

gpu-proxy reaches into private parts of Ray, Lightning, torch and Keras (listed per library below).
Those change without deprecation between minor releases, and a change would surface mid-run, on a
worker, as an AttributeError far from its cause. So each library has one gate, called where the
package that uses its private parts is imported: outside the range the tests ran on, the import
fails with the range and the fix. The ranges are the pins of ``pyproject.toml``
(tests/core/test_version_gates.py keeps the two equal). ``GPU_PROXY_SKIP_VERSION_CHECK=1`` turns the
failure into a warning, for trying a newer release.

No framework is imported here: versions come from the already imported module or the installed
package's metadata.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from gpu_proxy.errors import GpuProxyError

SKIP_ENV = "GPU_PROXY_SKIP_VERSION_CHECK"

logger = logging.getLogger(__name__)


class UntestedVersionError(GpuProxyError, ImportError):
    """A library's version is outside the range gpu-proxy's use of its private parts was tested on."""


class MissingExtraError(GpuProxyError, ImportError):
    """A module needs an optional extra of gpu-proxy that is not installed."""


@dataclass(frozen=True)
class Gate:
    library: str  # as its docs write it
    module: str  # the import name whose __version__ is checked
    distributions: tuple[str, ...]  # the pip names that install that module, first = the one to suggest
    supported: str  # a PEP 440 range: the pin in pyproject.toml
    tested: str  # what the test suite ran, in words
    private: str  # what gpu-proxy touches, for the message
    extra: str = ""  # the pip name's extras in the suggested install ("[default]")

    @property
    def requirement(self) -> str:
        return f"{self.distributions[0]}{self.extra}{self.supported}"


GATES: dict[str, Gate] = {gate.module: gate for gate in (
    Gate("Ray", "ray", ("ray",), ">=2.60,<2.61", "2.60.x",
         "ray._private (the embedded cluster's start: constants, RayParams, Node.start_api_server; its node "
         "at exit; the launcher's command runner), "
         "ray._raylet.GcsClient, "
         "ray.experimental.internal_kv's _internal_kv_* functions", extra="[default]"),
    Gate("Lightning", "lightning", ("lightning",), ">=2.6,<2.7", "2.6.x",
         "_Launcher, _GlobalStateSnapshot, _interrupt, the Trainer's accelerator and logger connectors, "
         "the arguments of Trainer._fit_impl, the loops' private state, lightning.fabric's FSDP helpers"),
    Gate("pytorch-lightning", "pytorch_lightning", ("pytorch-lightning",), ">=2.6,<2.7", "2.6.x",
         "the private parts of Lightning listed for `lightning`, through the pytorch_lightning mirror"),
    Gate("torch", "torch", ("torch",), ">=2.4,<2.14", "2.13.x (the API it uses exists since 2.4)",
         "torch.distributed.checkpoint._fsspec_filesystem (sharded checkpoints)"),
    Gate("Keras", "keras", ("keras",), ">=3.15.1,<3.16", "3.15.x from 3.15.1",
         "keras.src: the TensorFlow trainer the multi-worker fix patches, saving_lib, Model._symbolic_build, "
         "Model._flatten_metrics_in_order, rng_utils.get_random_seed"),
    Gate("TensorFlow", "tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel"),
         ">=2.21,<2.22", "2.21.x",
         "MultiWorkerMirroredStrategy's distributed values, as Keras' trainer patched for several workers uses them"),
)}


def skip_requested() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes")


def installed_version(module: str) -> str | None:
    """The version of ``module``: its ``__version__`` once imported, else its package's metadata; None if absent."""
    gate = GATES[module]
    loaded = sys.modules.get(module)
    if loaded is not None and isinstance(getattr(loaded, "__version__", None), str):
        return loaded.__version__
    for distribution in gate.distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def in_range(module: str, version: str) -> bool:
    try:
        return SpecifierSet(GATES[module].supported).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def untested_message(module: str, version: str, hint: str = "") -> str:
    gate = GATES[module]
    return (f"gpu-proxy {_own_version()} was tested with {gate.library} {gate.tested}; you have {gate.library} "
            f"{version}. It uses private parts of {gate.library} ({gate.private}), which change between "
            f"releases. Install a tested one: pip install \"{gate.requirement}\"{'; ' + hint if hint else ''}; "
            f"or set {SKIP_ENV}=1 to try this one anyway (a changed private part then fails mid-run).")


def check(module: str, version: str | None = None, hint: str = "") -> None:
    """Raise :class:`UntestedVersionError` when ``module``'s version (the installed one by default) is
    outside its gate's range; only warn when ``GPU_PROXY_SKIP_VERSION_CHECK=1``. Not installed: nothing
    to check (the import that follows says so itself). ``hint``: another way out ("or ..."), for the message."""
    found = version if version is not None else installed_version(module)
    if found is None or in_range(module, found):
        return
    message = untested_message(module, found, hint)
    if skip_requested():
        logger.warning("%s is set: going on with an untested version. %s", SKIP_ENV, message)
        return
    raise UntestedVersionError(message, name=module)


def require_extra(extra: str, module: str, feature: str) -> None:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that brings it."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(f"{feature} needs {module}, which is not installed here ({error}). Install it with: "
                                f"pip install \"gpu-proxy[{extra}]\"", name=module) from error


def _own_version() -> str:
    try:
        return importlib.metadata.version("gpu-proxy")
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules.get("gpu_proxy"), "__version__", "(source tree)")
