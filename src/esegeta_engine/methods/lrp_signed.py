"""Sums and back-projections of a linear module's positive (negative) contributions, lean in time and memory.

The z+ rule (LRP's alpha-beta rules, the default ``epsilon_plus`` composite) and excitation backprop
need, for every output ``i`` of a linear module (convolution, transposed convolution, linear layer)
with weights ``w``, bias ``b`` and input ``a``,

    ``z_i = sum_j (w_ij a_j)^+ + b_i^+``   and   ``R_j = sum_i (w_ij a_j)^+ s_i``

(``^-`` for the negative share). Written as it reads, each sum is one module call on ``a+`` with
``w+`` and one on ``a-`` with ``w-``, and the back-projection likewise two transposed calls: four
convolutions' worth per layer beside the forward's one, with inputs and gradients stacked along
channels (about eight input-sized temporaries alive at once). Here:

* **The sum from the forward's output and one call.** ``max(0, u) = (|u| + u) / 2`` for every
  contribution ``u = w_ij a_j``, so with ``y = f_{w,b}(a)`` (the module's own output, kept by the
  forward) and ``t = f_{|w|,|b|}(|a|)``:  ``z+ = (t + y) / 2`` and ``z- = (y - t) / 2``.
  The subtraction loses digits where ``|z|`` is small beside ``t`` (relative error about
  ``t / |z|`` times the float rounding of the sums); wherever ``|z| < RHO * t`` somewhere in the
  layer, the layer's sum is recomputed as written (two calls, one half at a time). On MONAI's
  BasicUNet (a random 48^3 input) the smallest ``z+ / t`` of the 3x3x3 convolutions with 32 or more
  input channels is about 0.3; the guard took the layers with few contributions per output: the
  one-channel first convolution, the 1x1 output convolution and two 2x2x2 transposed convolutions
  (together a few per cent of the network's multiply-adds).
* **The back-projection into one buffer.** ``R_j = a_j (J_{w+}^T s)_j`` where ``a_j > 0`` and
  ``a_j (J_{w-}^T s)_j`` where ``a_j < 0``: two transposed calls (one where ``a`` has no negative
  entry, after a ReLU), selected and multiplied in place; no stacked copies.

Everything runs without autograd (the transposed products are backward-data calls, never a
forward re-run with a graph). The result equals the written-out rule up to float rounding
(``tests/engine/test_methods_lrp_signed.py`` compares both with an independent dense form).
"""

from __future__ import annotations

import torch
from torch import nn

from esegeta_engine.methods.lrp_linear import TINY, module_forward, transposed

RHO = 1.0 / 16
"""Smallest ``|z| / t`` the identity ``z = (y +- t) / 2`` is trusted at (its error is then at most
about 16 times the rounding of the sums themselves); below it the sum is computed as written."""


def has_negative(a: torch.Tensor) -> bool:
    """Whether ``a`` has a negative entry (one reduction, no temporary)."""
    return a.numel() > 0 and bool(a.amin() < 0)


def bias_term(module: nn.Module, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The bias ``b`` shaped to add to the module's output ``y`` (channels on axis 1, except linear layers)."""
    return b if isinstance(module, nn.Linear) else b.reshape(1, -1, *([1] * (y.dim() - 2)))


def _part(t: torch.Tensor | None, sign: int) -> torch.Tensor | None:
    return None if t is None else (t.clamp(min=0) if sign > 0 else t.clamp(max=0))


def written_out(module: nn.Module, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                sign: int) -> torch.Tensor:
    """``sum_j (w_ij a_j)^sign + b_i^sign`` as written: ``f_{w^s}(a+) + f_{w^-s}(a-)``, one half at a time."""
    f = module_forward(module)
    with torch.no_grad():
        z = f(a.clamp(min=0), _part(w, sign), _part(b, sign))
        if has_negative(a):
            z.add_(f(a.clamp(max=0), _part(w, -sign), None))
    return z


def contribution_sums(module: nn.Module, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                      y: torch.Tensor | None, signs: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
    """``z = sum_j (w_ij a_j)^s + b_i^s`` for each ``s`` of ``signs`` (+1 positive, -1 negative parts).

    Parameters
    ----------
    module : nn.Module
        A convolution, transposed convolution or linear layer (its stride, padding, groups...).
    a : torch.Tensor
        The module's input.
    w, b : torch.Tensor
        The weights and bias the contributions are taken of (``b`` None: no bias term).
    y : torch.Tensor or None
        ``f_{w,b}(a)`` if known (the forward's output, same dtype as ``a``); None computes it.
    signs : tuple of int

    Returns
    -------
    list of torch.Tensor
        One fresh tensor per sign, shaped like the module's output.
    """
    a = a.detach()
    if not has_negative(a):  # a = a+: each sum is one call, as written
        return [written_out(module, a, w, b, s) for s in signs]
    f = module_forward(module)
    with torch.no_grad():
        y = f(a, w, b) if y is None else y.detach()
        t = f(a.abs(), w.abs(), None if b is None else b.abs())
        sums = []
        for s in signs:
            # |z| < RHO t  <=>  s y + (1 - 2 RHO) t < 0
            margin = torch.add(t, y, alpha=s)
            if bool(margin.sub_(t, alpha=2 * RHO).amin() < 0):
                sums.append(written_out(module, a, w, b, s))
                continue
            sums.append(torch.add(y, t, alpha=s, out=margin).mul_(0.5))
    return sums


def divide_stabilised(R: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """``R / (z + eps * sign(z))`` with ``sign(0) = 1``, written into ``z`` (as ``stabilise``)."""
    e = max(eps, TINY)
    z.add_(torch.where(z >= 0, e, -e).to(z.dtype))
    if R.dtype == z.dtype and R.shape == z.shape:
        return torch.div(R, z, out=z)
    return R / z


def split_back(module: nn.Module, a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               s: torch.Tensor) -> torch.Tensor:
    """``a+ J_{w1}^T s + a- J_{w2}^T s``: the relevance ``s`` sends back through contributions
    ``w1 a+`` and ``w2 a-`` (``w1 = w+, w2 = w-``: the positive ones)."""
    a = a.detach()
    with torch.no_grad():
        g = transposed(module, a, w1, s)
        if has_negative(a):
            other = transposed(module, a, w2, s)
            torch.where(a > 0, g, other, out=g)
            del other
        return g.mul_(a)
