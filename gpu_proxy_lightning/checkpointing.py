"""Where a remote Lightning run keeps its checkpoints: ``<checkpoint_dir>/<run_name>/`` on any fsspec URL.

Decided and checked at home before any worker starts; the workers write through
:class:`~gpu_proxy_lightning.checkpoint_io.AsyncFsspecCheckpointIO` (atomic commits, uploads behind
the step loop), and resume picks the newest *committed* checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import inspect
import os
import uuid
import warnings
from typing import Any, Iterator

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gpu_proxy.errors import ConfigurationError
from gpu_proxy.storage import check_writable, latest_committed
from gpu_proxy.storage.location import protocol_of
from gpu_proxy_lightning.checkpoint_io import AsyncFsspecCheckpointIO



def new_run_name() -> str:
    return f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def check_run_name(run_name: Any, where: str = "RunStorage") -> None:
    """A run name is one folder under checkpoint_dir: never a path that could point outside it."""
    if not isinstance(run_name, str):
        raise ConfigurationError(f"{where}(run_name={run_name!r}): give a folder name as a string, e.g. \"exp1\".")
    if not run_name.strip() or run_name in (".", "..") or any(c in run_name for c in ("/", "\\", "\0")):
        raise ConfigurationError(
            f"{where}(run_name={run_name!r}): a run name is one folder under checkpoint_dir; give a non-empty "
            "name without path separators or '..', e.g. \"exp1\".")


class RunStorage:
    def __init__(self, checkpoint_dir: str, run_name: str, storage_options: dict[str, Any] | None) -> None:
        check_run_name(run_name)
        self.run_url = f"{checkpoint_dir.rstrip('/')}/{run_name}"
        self.checkpoints_url = f"{self.run_url}/checkpoints"
        self.storage_options = storage_options

    def check(self) -> None:
        check_writable(self.run_url, self.storage_options)

    def latest(self) -> str | None:
        return latest_committed(self.checkpoints_url, self.storage_options)

    def configure(self, trainer: Any) -> None:
        """Point the Trainer's checkpoints here unless the user chose their own places."""
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default: the user set no plugin
            strategy.checkpoint_io = AsyncFsspecCheckpointIO(self.storage_options)
        elif isinstance(strategy.checkpoint_io, AsyncFsspecCheckpointIO) and strategy.checkpoint_io.storage_options is None:
            strategy.checkpoint_io.storage_options = self.storage_options  # the user's plugin, given no options
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = self.checkpoints_url
        if os.path.abspath(str(trainer._default_root_dir)) == os.getcwd():
            trainer._default_root_dir = self.run_url

    def resolve_ckpt_path(self, function: Any, args: tuple, kwargs: dict, continue_run: bool) -> tuple[tuple, dict]:
        """``fit(ckpt_path="last")``, or a named run that exists, means the newest committed checkpoint."""
        if not is_fit(function):
            return args, kwargs
        requested = fit_arguments(function, args, kwargs).arguments.get("ckpt_path")
        if requested is None and continue_run:
            latest = self.latest()
            return with_ckpt_path(function, args, kwargs, latest) if latest else (args, kwargs)
        if requested != "last":
            return args, kwargs
        latest = self.latest()
        if latest is None:
            warnings.warn(f'ckpt_path="last": no committed checkpoint under {self.checkpoints_url}; starting afresh.')
        return with_ckpt_path(function, args, kwargs, latest)


def is_fit(function: Any) -> bool:
    """Whether the launcher was given ``Trainer.fit``'s body (Lightning launches ``Trainer._fit_impl``)."""
    from lightning.pytorch import Trainer

    return getattr(function, "__func__", None) is Trainer._fit_impl


def fit_arguments(function: Any, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    # By name, from the signature: Lightning passes them positionally, in an order that may change.
    return inspect.signature(function).bind_partial(*args, **kwargs)


def with_ckpt_path(function: Any, args: tuple, kwargs: dict, ckpt_path: str | None) -> tuple[tuple, dict]:
    """The launcher's arguments for ``fit`` with ``ckpt_path`` in place of the given one."""
    bound = fit_arguments(function, args, kwargs)
    bound.arguments["ckpt_path"] = ckpt_path
    return bound.args, bound.kwargs


@contextlib.contextmanager
def run_storage_options(checkpoint_dir: str | None, storage_options: dict[str, Any] | None) -> Iterator[None]:
    """For the run's lifetime only, let Lightning's option-less fsspec calls use the run's options.

    Our checkpoint IO gets the options passed to it, but Lightning opens URLs with fsspec's defaults
    and no way to pass options (``ModelCheckpoint.setup`` lists its folder, the checkpoint connector
    looks at ``default_root_dir``, ``load_from_checkpoint`` in user code), so they must sit in
    ``fsspec.config.conf`` while the run goes on. Ray reuses this worker process for later runs, which
    must not find them: on the way out the previous entry is put back exactly and the filesystem
    instances fsspec cached for that protocol (each holding the credentials) are dropped.
    """
    if not checkpoint_dir or not storage_options:
        yield
        return
    import fsspec
    import fsspec.config

    protocol = protocol_of(checkpoint_dir)
    had, previous = protocol in fsspec.config.conf, copy.deepcopy(fsspec.config.conf.get(protocol))
    fsspec.config.conf[protocol] = {**(previous or {}), **storage_options}
    try:
        yield
    finally:
        if had:
            fsspec.config.conf[protocol] = previous
        else:
            fsspec.config.conf.pop(protocol, None)
        with contextlib.suppress(ImportError, ValueError):
            fsspec.get_filesystem_class(protocol).clear_instance_cache()
