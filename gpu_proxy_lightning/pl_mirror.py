"""The same strategy for users who import ``pytorch_lightning`` instead of ``lightning.pytorch``.

The two packages hold the same code under different names, and a Trainer only accepts strategy
classes from its own package. Rather than keeping two copies, the modules of this package are
loaded a second time, as ``gpu_proxy_lightning.pl.<module>``, with their imports of
``lightning.pytorch``/``lightning.fabric`` pointed at ``pytorch_lightning``/``lightning_fabric``
(the rewrite Lightning itself applies to build ``pytorch_lightning``). The mirrored modules are
importable by name, so they pickle by reference like the originals.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from gpu_proxy import version_gates

PACKAGE = "gpu_proxy_lightning"
MIRROR = f"{PACKAGE}.pl"
_REWRITES = (("lightning.pytorch", "pytorch_lightning"), ("lightning.fabric", "lightning_fabric"),
             (f"{PACKAGE}.", f"{MIRROR}."))
_HERE = Path(__file__).resolve().parent


class _MirrorFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):  # type: ignore[override]
        if fullname == MIRROR:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if fullname.startswith(MIRROR + ".") and (_HERE / f"{fullname[len(MIRROR) + 1:]}.py").is_file():
            return importlib.machinery.ModuleSpec(fullname, self, origin=str(_HERE / f"{fullname[len(MIRROR) + 1:]}.py"))
        return None

    def create_module(self, spec):  # type: ignore[override]
        return None

    def exec_module(self, module) -> None:  # type: ignore[override]
        if module.__name__ == MIRROR:
            module.__path__ = []  # a namespace for the mirrored modules
            return
        source = Path(module.__spec__.origin).read_text()
        for old, new in _REWRITES:
            source = source.replace(old, new)
        module.__file__ = module.__spec__.origin
        exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102


def install() -> None:
    if not any(isinstance(finder, _MirrorFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MirrorFinder())


def register_in_pytorch_lightning() -> bool:
    """Register ``"remote_gpu"`` in ``pytorch_lightning``'s registry too, when it is installed
    (``lightning`` 2.6 installs it); a version outside the tested range fails here, at import."""
    if importlib.util.find_spec("pytorch_lightning") is None:
        return False
    version_gates.check("pytorch_lightning")
    install()
    from pytorch_lightning.strategies import StrategyRegistry

    mirrored = importlib.import_module(f"{MIRROR}.strategy")
    mirrored.RemoteStrategy.register_strategies(StrategyRegistry)
    importlib.import_module(f"{MIRROR}.remote_accelerator").install()
    return True
