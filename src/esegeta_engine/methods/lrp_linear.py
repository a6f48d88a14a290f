"""A linear module with replaced weights: its forward and its transposed product, without autograd.

The primitives every LRP rule (:mod:`.lrp_rules`, :mod:`.lrp_signed`) and the attention rules build on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Forward = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]

TINY = 1e-12


def stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = 1``, never exactly zero."""
    sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return z + sign * max(eps, TINY)


def module_forward(module: nn.Module) -> Forward:
    """``forward(a, weight, bias)``: the module with replaced parameters (same stride, padding...)."""
    def forward(a: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
                ) -> torch.Tensor:
        params: dict[str, Any] = {}
        if weight is not None:
            params["weight"] = weight
        if "bias" in dict(module.named_parameters(recurse=False)):
            params["bias"] = bias if bias is not None else torch.zeros_like(module.bias)
        return functional_call(module, params, (a,))
    return forward


def vjp(forward: Forward, a: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None,
         s: torch.Tensor) -> torch.Tensor:
    """``J_w^T s`` at ``a`` for the module with weight ``w`` and bias ``b``."""
    a = a.detach().requires_grad_(True)
    with torch.enable_grad():
        z = forward(a, w, b)
        (g,) = torch.autograd.grad(z, a, s)
    return g


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def transposed(module: nn.Module, a: torch.Tensor, w: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor:
    """``J_w^T s`` for ``module`` with weight ``w`` at an input shaped like ``a``.

    Convolutions (zero padding, numeric padding) and linear layers are linear in their input, so
    their transposed Jacobian is one backward-data call (the gradient's own kernel), with no
    forward pass re-run; any other module (average pooling, padding modes, mixed dtypes) goes
    through :func:`vjp`.
    """
    a = a.detach()
    same = w is not None and w.dtype == a.dtype == s.dtype
    if same and isinstance(module, _CONVS) and module.padding_mode == "zeros" \
            and not isinstance(module.padding, str):
        is_t = isinstance(module, nn.modules.conv._ConvTransposeNd)
        nd = a.dim() - 2
        out_pad = list(module.output_padding) if is_t else [0] * nd
        with torch.no_grad():
            g, _, _ = torch.ops.aten.convolution_backward(
                s.contiguous(), a, w, None, list(module.stride), list(module.padding),
                list(module.dilation), is_t, out_pad, module.groups, [True, False, False])
        return g
    if same and isinstance(module, nn.Linear):
        with torch.no_grad():
            return s @ w
    return vjp(module_forward(module), a, w, None, s)


def parameters_of(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    return (None if w is None else w.detach()), (None if b is None else b.detach())


def z_of(forward: Forward, a: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None
       ) -> torch.Tensor:
    with torch.no_grad():
        return forward(a, w, b)
