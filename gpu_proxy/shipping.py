"""Sending the user's objects to workers, and their results and errors back.

User code travels by value: classes and functions from the user's ``__main__`` script and from
modules of the user's project directory are pickled with their code (cloudpickle's by-value mode),
so workers need neither the user's files nor a working-directory upload. Installed packages are
pickled by reference and must be installed on the cluster's nodes.
"""
from __future__ import annotations

import functools
import os
import pickle
import sys
import sysconfig
import traceback
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle

from gpu_proxy.errors import RemoteError, ShippingError
from gpu_proxy.secrets import collecting

if TYPE_CHECKING:
    from gpu_proxy.dataplane.package import Package

_INSTALLED_ROOTS = tuple(
    str(Path(p).resolve())
    for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    | {sys.prefix, sys.base_prefix, sys.exec_prefix}
)
_OWN_PACKAGES = ("gpu_proxy", "gpu_proxy_lightning", "gpu_proxy_keras")


def project_roots() -> list[Path]:
    """Directories whose modules are the user's own code: the main script's folder and the cwd."""
    roots = [Path.cwd().resolve()]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        roots.append(Path(main_file).resolve().parent)
    return roots


def _is_project_module(module: ModuleType, roots: list[Path]) -> bool:
    name = module.__name__
    if name == "__main__" or name.split(".")[0] in _OWN_PACKAGES:
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return False
    path = _resolved(file)
    if path.startswith(_INSTALLED_ROOTS) or "site-packages" in path or "dist-packages" in path:
        return False
    return any(path.startswith(str(root) + os.sep) for root in roots)


@functools.lru_cache(maxsize=None)
def _resolved(file: str) -> str:
    # Every run checks every imported module (TensorFlow alone brings ~10k); resolving their paths
    # each time cost 0.35 s per pickle.
    return str(Path(file).resolve())


def register_project_modules() -> list[str]:
    """Mark every imported module of the user's project to be pickled by value."""
    roots = project_roots()
    registered = []
    for module in list(sys.modules.values()):
        if isinstance(module, ModuleType) and _is_project_module(module, roots):
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:  # a module that is not importable by its name (rare): skip it
                continue
            registered.append(module.__name__)
    return registered


def dumps(obj: Any, what: str = "the run", secrets: dict[str, str] | None = None) -> bytes:
    """Pickle ``obj`` for the workers, or raise :class:`ShippingError` naming what cannot be sent.

    Secrets inside ``obj`` (:class:`gpu_proxy.secrets.Concealed`) pickle as references; their values
    are added to ``secrets``, which must travel beside the pickle (``RunSpec.secrets``).
    """
    register_project_modules()
    try:
        with collecting() as found:
            data = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if secrets is not None:
            secrets.update(found)
        return data
    except Exception as exc:  # noqa: BLE001 - any pickling failure is reported the same way
        raise _unshippable(obj, what, exc) from exc


def _unshippable(obj: Any, what: str, exc: Exception) -> ShippingError:
    path = find_unpicklable(obj, what)
    return ShippingError(
        f"{path or what} cannot be sent to the remote workers: {type(exc).__name__}: {exc}. "
        "Objects of a run are pickled; hold such resources (locks, open files, sockets, "
        "generators) outside the module/callback or create them in a setup hook.")


def loads(data: bytes) -> Any:
    return cloudpickle.loads(data)


#: type -> reducer for objects whose memory should travel out of band (see :func:`pack`). A reducer
#: returns a ``__reduce__`` tuple whose large parts are ``pickle.PickleBuffer``s, or ``NotImplemented``
#: to leave the object to its own pickling. Frameworks register theirs (``gpu_proxy_lightning``
#: registers torch tensors); numpy arrays need none, they support protocol 5 themselves.
_OUT_OF_BAND: dict[type, Callable[[Any, dict], Any]] = {}


def register_out_of_band(cls: type, reducer: Callable[[Any, dict], Any]) -> None:
    """Pickle instances of exactly ``cls`` with ``reducer(obj, memo)``; ``memo`` lives for one :func:`pack`."""
    _OUT_OF_BAND[cls] = reducer


class _BufferPickler(cloudpickle.Pickler):
    def __init__(self, file: Any, buffers: list) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self.reducer_memo: dict = {}  # e.g. one entry per tensor storage, so shared storage stays shared

    def reducer_override(self, obj: Any) -> Any:
        reducer = _OUT_OF_BAND.get(type(obj))
        if reducer is not None:
            reduced = reducer(obj, self.reducer_memo)
            if reduced is not NotImplemented:
                return reduced
        return super().reducer_override(obj)


def pack(obj: Any, what: str = "the run", secrets: dict[str, str] | None = None) -> "Package":
    """Like :func:`dumps`, but large buffers stay out of the pickle stream, uncopied (a :class:`Package`).

    Packing a model refers to its tensors' memory instead of copying it; the package is then written
    once, to wherever it goes (a file, a socket, the object store).
    """
    import io

    from gpu_proxy.dataplane.package import Package

    register_project_modules()
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    try:
        with collecting() as found:
            _BufferPickler(stream, buffers).dump(obj)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is reported the same way
        raise _unshippable(obj, what, exc) from exc
    if secrets is not None:
        secrets.update(found)
    return Package(stream.getvalue(), [_flat(b) for b in buffers])


def _flat(buffer: pickle.PickleBuffer) -> Any:
    from gpu_proxy.dataplane.package import as_bytes_array

    try:
        return as_bytes_array(buffer)  # a contiguous buffer as flat bytes, no copy
    except (BufferError, ValueError):  # a non-contiguous array: one copy, as pickle would have made in band
        return as_bytes_array(bytes(buffer))


def _picklable(obj: Any) -> bool:
    try:
        cloudpickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001
        return False


def find_unpicklable(obj: Any, name: str, depth: int = 6) -> str | None:
    """The dotted path of the innermost attribute that cannot be pickled, e.g. ``model.lock``."""
    if _picklable(obj):
        return None
    if depth == 0:
        return f"{name} (a {type(obj).__name__})"
    children: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        children = [(f"{name}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = [(f"{name}[{i}]", v) for i, v in enumerate(obj)]
    else:
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            children = [(f"{name}.{k}", v) for k, v in state.items()]
    for child_name, child in children:
        found = find_unpicklable(child, child_name, depth - 1)
        if found:
            return found
    return f"{name} (a {type(obj).__name__})"


def pack_exception(exc: BaseException) -> dict[str, Any]:
    """What a worker sends home about an exception: the object if it pickles, and always its text."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = cloudpickle.dumps(exc)
        pickle.loads(blob)  # an exception whose __init__ cannot rebuild it fails here, not at home
    except Exception:  # noqa: BLE001
        blob = None
    return {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc),
            "traceback": text, "pickled": blob}


def unpack_exception(packed: dict[str, Any], where: str) -> BaseException:
    """Rebuild a worker's exception at home, its remote traceback in the message."""
    remote_tb = f"Remote traceback ({where}):\n{packed['traceback']}"
    exc: BaseException | None = None
    if packed.get("pickled"):
        try:
            exc = cloudpickle.loads(packed["pickled"])
        except Exception:  # noqa: BLE001 - the class is not importable here
            exc = None
    if exc is None:
        return RemoteError(packed["type"], packed["message"], packed["traceback"])
    if exc.args and isinstance(exc.args[0], str) and not isinstance(exc, KeyError):
        exc.args = (f"{exc.args[0]}\n\n{remote_tb}",) + tuple(exc.args[1:])
    elif hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(remote_tb)
    return exc
