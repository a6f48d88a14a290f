"""Cancel points inside one model evaluation: between the network's modules, forward and backward.

Cancellation is checked before every model evaluation and every patch batch
(:class:`~esegeta_engine.forward.scoring.EvaluationMonitor`). One evaluation can still be long: a
whole-volume forward of a 197×233×189 scan takes ~15 s on a CPU, the backward of a 64³ U-Net ~5 s. Within
:func:`cancel_points` the check also runs

- **forward**: before every module call of this thread (one global module forward pre-hook, installed
  while a block is open anywhere and acting only in the thread that opened the block);
- **backward**: when the gradient reaches the input of a leaf module (a hook on that intermediate
  tensor, registered in the forward; it lives and dies with the graph, in whichever thread runs the
  backward).

The check raises (``Cancelled``, ``MethodTimeout``), which torch and Captum propagate like any error of
the network. The user's model is not touched: no module hook is added to it, and the tensor hooks sit
on intermediate tensors of this evaluation only (never on a leaf such as the method's input).
TorchScript models run their modules inside C++, so there the check stays between evaluations.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["cancel_points", "current_check"]

Check = Callable[[], None]

_local = threading.local()  # .checks: the open blocks' checks in this thread, innermost last
_lock = threading.Lock()
_installed: list[Any] = []  # [handle, number of open blocks] while any block is open


@contextlib.contextmanager
def cancel_points(check: Check | None) -> Iterator[None]:
    """Within the block, run ``check`` before each module call and in the backward of what it builds.

    Parameters
    ----------
    check : callable or None
        Raises to stop (e.g. :meth:`EvaluationMonitor.check`); ``None``: the block does nothing.
    """
    if check is None:
        yield
        return
    stack: list[Check] = _local.__dict__.setdefault("checks", [])
    with _lock:
        if not _installed:
            _installed[:] = [nn.modules.module.register_module_forward_pre_hook(_before_module), 0]
        _installed[1] += 1
    stack.append(check)
    try:
        yield
    finally:
        stack.pop()
        with _lock:
            _installed[1] -= 1
            if _installed[1] == 0:
                _installed[0].remove()
                _installed.clear()


def current_check() -> Check | None:
    """The innermost open block's check in this thread (None: none open).

    For an autograd ``Function`` whose forward runs its modules with gradients off: nothing it builds gets
    a backward check here, so it keeps this one and calls it in its own backward.
    """
    checks = getattr(_local, "checks", None)
    return checks[-1] if checks else None


def _before_module(module: nn.Module, args: tuple[Any, ...]) -> None:
    checks = getattr(_local, "checks", None)
    if not checks:  # another thread's evaluation, or none open
        return None
    check = checks[-1]
    check()
    if torch.is_grad_enabled() and next(module.children(), None) is None:
        for t in args:
            if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None:
                t.register_hook(_backward_check(check))
    return None


def _backward_check(check: Check) -> Callable[[torch.Tensor], None]:
    def hook(_grad: torch.Tensor) -> None:
        check()

    return hook
