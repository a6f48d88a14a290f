"""The executor registry: names -> factories, importable without torch.

An executor runs planned jobs behind one seam, ``map(specs) -> outcomes`` and ``close()``
(see :mod:`esegeta_engine.jobs.executors`). Config validation (``execution.executor``,
``cohort.executor``), the CLI's ``--executor`` choices and :func:`make_executor` all read
this registry, so a new executor is one module plus one registration line::

    # my_package/slurm.py
    def make(settings, cancel):      # settings: execution or cohort section
        return SlurmExecutor(settings.scheduler, cancel)

    # one line: in BUILTIN below (a built-in), or anywhere before the config is read
    register_executor("slurm", make)               # or "my_package.slurm:make"

A factory is a callable ``factory(settings, cancel) -> executor``, or a ``"module:attr"``
string naming one (imported only when that executor is made, so listing names stays light).
``settings`` has ``devices``, ``workers``, ``scheduler`` and ``connect_timeout_s``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from esegeta_engine.errors import ConfigError

__all__ = ["BUILTIN", "executor_names", "get_executor_factory", "make_executor", "register_executor"]

Factory = Callable[[Any, Any], Any]

BUILTIN: dict[str, str] = {
    "inline": "esegeta_engine.jobs.executors:make_inline",
    "pool": "esegeta_engine.jobs.executors:make_pool",
    "local": "esegeta_engine.jobs.executors:make_local",
    "dask": "esegeta_engine.jobs.executors:make_dask",
}
"""The executors that ship with esegeta (name -> ``"module:factory"``)."""

_REGISTRY: dict[str, Factory | str] = dict(BUILTIN)


def register_executor(name: str, factory: Factory | str) -> None:
    """Register ``factory`` under ``name`` (replacing an earlier registration of that name).

    Raises
    ------
    ValueError
        If ``name`` is not a short lowercase identifier.
    """
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"executor name {name!r} must be a lowercase identifier")
    _REGISTRY[name] = factory


def executor_names() -> tuple[str, ...]:
    """The registered executor names, built-ins first."""
    return tuple(_REGISTRY)


def get_executor_factory(name: str) -> Factory:
    """The factory registered as ``name`` (imported on first use when registered by path).

    Raises
    ------
    ConfigError
        If no executor has that name.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(f"unknown executor {name!r}", f"use one of {', '.join(executor_names())}")
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory


def make_executor(settings: Any, kind: str | None = None, cancel: Any = None) -> Any:
    """The executor named ``kind`` (default ``settings.executor``), connected and ready.

    Parameters
    ----------
    settings : ExecutionConfig or CohortSection
        Where the jobs run (``executor``, ``devices``, ``workers``, ``scheduler``,
        ``connect_timeout_s``).
    kind : str, optional
        Overrides ``settings.executor`` (``--executor``).
    cancel : threading.Event, optional
        Stops the jobs in flight and the rest.
    """
    return get_executor_factory(kind or settings.executor)(settings, cancel)


def check_executor_name(name: str) -> str:
    """``name`` if an executor is registered under it (for config validators).

    Raises
    ------
    ValueError
        Naming the registered executors.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown executor {name!r}: use one of {', '.join(executor_names())}")
    return name
