"""DeepLIFT's rules with the input and the reference run as two passes instead of one batch of two.

Captum's ``DeepLift`` runs ``[inputs; baselines]`` as one batch and keeps, at every module with a
rule, clones of that batch's input and output until the backward pass reaches it. On a 3D U-Net
at a 96^3 patch that is twice the autograd graph of one pass plus two copies of every
nonlinearity's activations (7.3 GB where a forward + backward of the input takes 2.4 GB).

:class:`Rules` gives the same multipliers from two passes:

1. **Reference pass** (``mode = "record"``, no graph): each rule module's input ``a0`` is kept,
   per module in call order (a module called several times, e.g. MONAI SegResNet's one ReLU,
   keeps one entry per call: no structural copy is needed).
2. **Input pass** (``mode = "apply"``, with the graph): at each rule module the module runs on a
   detached copy of its input ``a`` (no graph of its own), the multiplier is computed at once
   from ``a``, ``a0`` and the outputs, ``a0`` is freed, and the output is a node whose backward
   multiplies by it. Memory: one multiplier per elementwise module, where a plain backward keeps
   one saved tensor; the reference's activations only until the input pass reaches them.

The rules are Captum's (``captum.attr._core.deep_lift``), for the input half of its batch:

- rescale (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus):
  ``m = (f(a) - f(a0)) / (a - a0)``, the local derivative where ``|a - a0| < eps``;
- max pooling: with ``y``, ``y0`` the pooled outputs and ``x = max(y, y0)``, the input's
  multiplier is ``(unpool(g (x - y0), idx) + unpool(g (y - x), idx0)) / (a - a0)`` (with
  overlapping windows the unpooled values add up here; Captum's ``max_unpool`` keeps one);
- softmax: the rescale multiplier times ``g``, minus its mean (Captum's normalisation).

Where every module on the way has a rule or is linear, the reference half of Captum's batch
carries the same upstream gradient ``g`` as the input half, and the two forms are equal. Where
a module has no rule (instance or group norm, named in the map's notes), Captum passes the
reference half its own plain gradient, which its max-pool rule reads through ``idx0``; here the
input's ``g`` is used there. Neither form then adds up to ``F(x) - F(x0)``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.deeplift_safe import has_rule

EPS = 1e-10
"""Captum's default: below this input difference a rule module passes its plain gradient."""

_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class _Multiplied(torch.autograd.Function):
    """``y`` in the forward pass; ``g -> rule(g)`` to the module's input in the backward pass."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, y: torch.Tensor, rule: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.rule = rule
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        rule, ctx.rule = ctx.rule, None
        return rule(g), None, None


def _derivative(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The elementwise module's local derivative at ``a`` (its plain gradient's factor)."""
    with torch.enable_grad():
        leaf = a.detach().requires_grad_(True)
        y = module.forward(leaf * 1.0)  # in-place modules act on a non-leaf copy
        (d,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
    return d


def _rescale(module: nn.Module, a: torch.Tensor, kept: list[torch.Tensor], y: torch.Tensor, eps: float):
    """``(f(a) - f(a0)) / (a - a0)``, at most two tensors of ``a``'s size beyond ``a`` and ``y`` at any time:
    ``f(a0)`` is formed in ``a0``'s own memory by an in-place module, ``f(a) - f(a0)`` in ``f(a0)``'s
    (``-f(a0) + f(a)``, the same bits), and ``|a - a0|`` in the difference's (no longer needed)."""
    a0 = kept.pop()  # the only reference: freed here once used
    d_in = a.detach() - a0
    m = module.forward(a0)  # in place for an in-place module: a0's memory (it is ours and not needed again)
    del a0
    m = m.neg_().add_(y) if m.data_ptr() != y.data_ptr() else y - m
    m /= d_in
    small = d_in.abs_() < eps
    del d_in
    if bool(small.any()):
        m = torch.where(small, _derivative(module, a), m)
    return lambda g: g * m


def _softmax(module: nn.Module, a: torch.Tensor, a0: torch.Tensor, y: torch.Tensor, eps: float):
    d_in = a.detach() - a0
    m = (y - module.forward(a0)) / d_in
    small = d_in.abs() < eps
    keep = a.detach() if bool(small.any()) else None

    def rule(g: torch.Tensor) -> torch.Tensor:
        u = g * m
        if keep is not None:
            with torch.enable_grad():
                leaf = keep.requires_grad_(True)
                (plain,) = torch.autograd.grad(module.forward(leaf), leaf, g)
            u = torch.where(small, plain, u)
        return u - u.sum() / u.numel()

    return rule


def _maxpool(module: nn.Module, a: torch.Tensor, a0: torch.Tensor, y: torch.Tensor, eps: float):
    """Captum's rule, its division by ``a - a0`` moved onto each pooled value: every output position's
    two weights are kept (``(x - y0) / (a - a0)`` at the input's maximum, ``(y - x) / (a - a0)`` at the
    reference's), with int32 indices: half an input's size, where Captum keeps the input twice."""
    dims = _POOL_DIMS[type(module)]
    args = (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, True)
    y0, idx0 = _POOL[dims](a0, *args)
    _, idx = _POOL[dims](a.detach(), *args)
    d_in = (a.detach() - a0).flatten(2)
    small = d_in.abs() < eps
    idx, idx0 = idx.flatten(2), idx0.flatten(2)
    top = torch.max(y, y0).flatten(2)
    # where the input's maximum sits on an unchanged voxel: the plain gradient (weight 1, Captum's
    # grad_input there); the reference's share to an unchanged voxel is dropped, as in Captum
    w_up = torch.where(small.gather(2, idx), 1.0, (top - y0.flatten(2)) / d_in.gather(2, idx))
    w_down = torch.where(small.gather(2, idx0), 0.0, (y.flatten(2) - top) / d_in.gather(2, idx0))
    del d_in, small, top, y0
    idx, idx0 = idx.to(torch.int32), idx0.to(torch.int32)
    shape = a.shape

    def rule(g: torch.Tensor) -> torch.Tensor:
        g = g.flatten(2)
        out = torch.zeros(*shape[:2], math.prod(shape[2:]), dtype=g.dtype, device=g.device)
        out.scatter_add_(2, idx.long(), g * w_up)  # overlapping windows add up
        out.scatter_add_(2, idx0.long(), g * w_down)
        return out.view(shape)

    return rule


def _rule_of(module: nn.Module):
    if type(module) in _POOL_DIMS:
        return _maxpool
    if isinstance(module, nn.Softmax):
        return _softmax
    return _rescale


class Rules:
    """Forward hooks on every module with a DeepLIFT rule in ``model``, switched by :attr:`mode`.

    ``"off"``: nothing; ``"record"``: keep each call's input (the reference pass); ``"apply"``:
    use them, in call order, for the input pass's multipliers. Call :meth:`close` to remove them.
    """

    def __init__(self, model: nn.Module, method: str, eps: float = EPS) -> None:
        self.mode = "off"
        self.method, self.eps = method, eps
        self.kept: dict[int, deque[torch.Tensor]] = {}
        self._open: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._handles = []
        for m in {id(m): m for m in model.modules()}.values():
            if has_rule(m):
                self._handles += [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post)]

    def close(self) -> None:
        """Remove the hooks and forget what was kept."""
        for h in self._handles:
            h.remove()
        self._handles, self.kept, self._open = [], {}, {}

    def expect_consumed(self) -> None:
        """Raise if the input pass left reference activations unused (the two passes differed)."""
        left = sum(len(q) for q in self.kept.values())
        self.kept, self._open = {}, {}
        if left:
            raise MethodError(
                f"{self.method}: the input and the baseline took different paths through the network "
                f"({left} rule-module calls of the baseline had no counterpart)",
                "use integrated_gradients, which needs no per-module reference activations")

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if self.mode == "off" or not args or not isinstance(args[0], torch.Tensor):
            return None
        a = args[0]
        if self.mode == "record":
            self.kept.setdefault(id(module), deque()).append(a.detach().clone())
            return None
        queue = self.kept.get(id(module))
        if not queue:
            raise MethodError(
                f"{self.method}: module {type(module).__name__} ran in the input pass but not in the "
                "baseline's (the two took different paths through the network)",
                "use integrated_gradients, which needs no per-module reference activations")
        a0 = queue.popleft()
        if a0.shape != a.shape or not a.requires_grad:
            self._open[id(module)] = None
            if a0.shape != a.shape:
                raise MethodError(f"{self.method}: {type(module).__name__} saw {tuple(a.shape)} for the input "
                                  f"and {tuple(a0.shape)} for the baseline",
                                  "give a baseline of the input's shape")
            return None
        self._open[id(module)] = (a, a0)
        inner = a.detach().clone() if getattr(module, "inplace", False) else a.detach()
        return (inner, *args[1:])

    def _post(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if self.mode != "apply":
            return None
        pair = self._open.pop(id(module), None)
        if pair is None:
            return None
        if not isinstance(out, torch.Tensor):
            raise MethodError(f"{self.method}: {type(module).__name__} returns {type(out).__name__}, "
                              "not one tensor", "use integrated_gradients for this network")
        a, kept = pair[0], [pair[1]]
        del pair  # the reference's activation now lives in ``kept`` only: a rule frees it once used
        make = _rule_of(module)
        rule = make(module, a, kept, out, self.eps) if make is _rescale else make(module, a, kept.pop(), out, self.eps)
        return _Multiplied.apply(a, out, rule)
