"""Batched model evaluations of perturbed copies: batch layout, per-axis sizes, the time budget.

Perturbed copies are stacked input-major (``[x0', x1', x0'', x1'', ...]``), the
layout frozen targets tile to, so a batch of ``b`` perturbations of ``N`` inputs
is one evaluation of ``b * N`` inputs.
"""

from __future__ import annotations

import math
import time

import torch

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.registry import MethodContext, Param
from esegeta_engine.forward.scoring import EvaluationMonitor

BATCH_SIZE = Param("batch_size", "int", 16,
                   "perturbed copies of each input per model evaluation (more: faster, more memory)",
                   minimum=1, maximum=100000)


def per_axis(value: int | tuple[int, ...], ctx: MethodContext, name: str) -> tuple[int, ...]:
    """An ``ints`` parameter as one size per spatial axis of ``ctx.inputs``.

    Raises
    ------
    MethodError
        If a tuple has the wrong number of entries.
    """
    dims = ctx.spatial_dims
    sizes = value if isinstance(value, tuple) else (value,) * dims
    if len(sizes) != dims:
        raise MethodError(f"parameter '{name}' has {len(sizes)} entries for {dims} spatial axes",
                          f"give one value or {dims} values")
    return sizes


def n_batches(items: int, batch_size: int) -> int:
    """Number of evaluations for ``items`` perturbations in batches of ``batch_size``."""
    return math.ceil(items / batch_size)


def stack_input_major(copies: torch.Tensor) -> torch.Tensor:
    """``(b, N, ...)`` perturbed copies -> ``(b * N, ...)`` batch, input-major."""
    return copies.reshape(copies.shape[0] * copies.shape[1], *copies.shape[2:])


def unstack_scores(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Scores ``(b * N,)`` of an input-major batch -> ``(N, b)``."""
    return scores.reshape(-1, n).T


class TimeBudget:
    """Refuse, after the first batch, a run that cannot finish within the time limit.

    Parameters
    ----------
    monitor : EvaluationMonitor or None
        The score model's monitor (its deadline is the method's time limit).
    method : str
        Method name for the message.
    items : int
        Perturbations to evaluate (e.g. masks).
    batch_size : int
        Perturbations per evaluation.
    param : str
        The parameter that sets ``items``, named in the fix.
    what : str
        What ``items`` counts, e.g. ``"masks"``.
    """

    def __init__(self, monitor: EvaluationMonitor | None, method: str, items: int, batch_size: int,
                 param: str, what: str) -> None:
        self.monitor, self.method, self.items = monitor, method, items
        self.batch_size, self.param, self.what = batch_size, param, what
        self.total = n_batches(items, batch_size)
        self.started = time.monotonic()

    def after_first_batch(self) -> None:
        """Raise :class:`MethodError` if the remaining batches would pass the deadline."""
        deadline = getattr(self.monitor, "deadline", None)
        if deadline is None or self.total < 2:
            return
        now = time.monotonic()
        per_batch = max(now - self.started, 1e-9)
        if now + per_batch * (self.total - 1) <= deadline:
            return
        fit = max(1, int((deadline - self.started) / per_batch)) * self.batch_size
        limit = getattr(self.monitor, "timeout_s", None) or deadline - self.started
        raise MethodError(
            f"method '{self.method}' with {self.items} {self.what} needs about "
            f"{per_batch * self.total:.3g} s ({per_batch:.3g} s per batch of {self.batch_size}), "
            f"more than its time limit of {limit:g} s",
            f"lower {self.param} to about {fit}, or raise the time limit (timeout_s)",
        )
