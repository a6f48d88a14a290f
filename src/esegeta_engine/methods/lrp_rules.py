"""LRP rules for one linear module (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, average pooling).

Each rule maps the relevance ``R`` at a module's output to the relevance at its
input ``a`` (Montavon et al. 2019, Layer-Wise Relevance Propagation: An
Overview). With ``f_w`` the module computed with weights ``w`` (bias ``b``)
and ``J_w^T`` the transposed Jacobian (one autograd call), the rules are:

``epsilon``
    ``R_in = a * J^T (R / (z + eps * sign(z)))`` with ``z = f(a)``; ``eps = 0`` is LRP-0.
``gamma``
    as epsilon with ``w + gamma * w+`` and ``b + gamma * b+`` (favours positive evidence).
``alpha_beta``
    ``R_in = alpha * R+ - beta * R-``, where ``R+`` (``R-``) redistributes ``R`` in
    proportion to the positive (negative) contributions ``w_ij a_j``, with
    ``beta = alpha - 1`` so relevance is conserved; ``alpha = 1`` is the z+ rule.
``zbox``
    for the first layer, with inputs bounded by ``low <= a <= high``:
    ``z = f(a) - f_{w+}(low) - f_{w-}(high)`` and
    ``R_in = a * J^T s - low * J_{w+}^T s - high * J_{w-}^T s`` with ``s = R / z``.
``flat``
    ``R`` spread uniformly over each output's receptive field (all weights 1, inputs 1).

Relevance absorbed by biases is not passed on; on bias-free layers every rule
conserves ``sum(R_in) = sum(R_out)`` up to the stabiliser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

Forward = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]

RULES = ("epsilon", "gamma", "alpha_beta", "zbox", "flat")

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


def _z(forward: Forward, a: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None
       ) -> torch.Tensor:
    with torch.no_grad():
        return forward(a, w, b)


def epsilon(module: nn.Module, a: torch.Tensor, R: torch.Tensor, eps: float = 1e-6,
            gamma: float = 0.0, z: torch.Tensor | None = None) -> torch.Tensor:
    """Epsilon rule (``gamma > 0``: gamma rule with its epsilon stabiliser).

    ``z``: the module's own output ``f(a)`` from the forward pass, reused for the plain epsilon rule
    when its dtype is the input's (no recomputation).
    """
    f = module_forward(module)
    w, b = parameters_of(module)
    if gamma and w is not None:
        w = w + gamma * w.clamp(min=0)
        b = None if b is None else b + gamma * b.clamp(min=0)
    if gamma or z is None or z.dtype != a.dtype or z.shape != R.shape:
        z = _z(f, a, w, b)
    s = R / stabilise(z.detach(), eps)
    return a * transposed(module, a, w, s)


def signed_parts(module: nn.Module, a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``z = f_{w1}(a+) + f_{w2}(a-) + bias`` and ``back(s) = a+ J_{w1}^T s + a- J_{w2}^T s``.

    The two halves run as one module call on the inputs stacked along channels (weights stacked
    to match): the same sum, at the cost of one call on twice the channels. Where ``a`` has no
    negative entry (after a ReLU) the ``a-`` half is zero and is left out.
    """
    f = module_forward(module)
    ap = a.clamp(min=0)
    if not bool((a < 0).any()):
        return _z(f, ap, w1, bias), lambda s: ap * transposed(module, ap, w1, s)
    an = a.clamp(max=0)
    if getattr(module, "groups", 1) == 1 and isinstance(module, (*_CONVS, nn.Linear)):
        dim = 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1
        channels = a.dim() - 1 if isinstance(module, nn.Linear) else 1  # the input's channel axis
        a2, w = torch.cat([ap, an], dim=channels), torch.cat([w1, w2], dim=dim)
        c = a.shape[channels]

        def back(s: torch.Tensor) -> torch.Tensor:
            g = transposed(module, a2, w, s)
            return ap * g.narrow(channels, 0, c) + an * g.narrow(channels, c, c)
        return _z(f, a2, w, bias), back
    z = _z(f, ap, w1, bias) + _z(f, an, w2, None)
    return z, lambda s: ap * transposed(module, ap, w1, s) + an * transposed(module, an, w2, s)


def alpha_beta(module: nn.Module, a: torch.Tensor, R: torch.Tensor, alpha: float = 2.0,
               eps: float = 1e-6) -> torch.Tensor:
    """Alpha-beta rule with ``beta = alpha - 1`` (inputs of either sign)."""
    f = module_forward(module)
    w, b = parameters_of(module)
    beta = alpha - 1.0
    if w is None:  # average pooling: every weight positive
        return epsilon(module, a, R, eps)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    bp = None if b is None else b.clamp(min=0)
    bn = None if b is None else b.clamp(max=0)

    def share(w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # relevance sent through contributions w1 * a+ and w2 * a- (same sign)
        z, back = signed_parts(module, a, w1, w2, bias)
        return back(R / stabilise(z, eps))

    positive = share(wp, wn, bp)
    if beta == 0:
        return alpha * positive
    return alpha * positive - beta * share(wn, wp, bn)


def zbox(module: nn.Module, a: torch.Tensor, R: torch.Tensor, low: torch.Tensor,
         high: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """z-box rule for the first layer, inputs bounded by ``low`` and ``high``."""
    f = module_forward(module)
    w, b = parameters_of(module)
    if w is None:
        return epsilon(module, a, R, eps)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    if low.shape[0] != a.shape[0]:  # patch batches of a batch of inputs: the batch's bounds
        low, high = low.amin(0, keepdim=True), high.amax(0, keepdim=True)
    low = low.expand_as(a)
    high = high.expand_as(a)
    z = _z(f, a, w, b) - _z(f, low, wp, None) - _z(f, high, wn, None)
    s = R / stabilise(z, eps)
    return a * transposed(module, a, w, s) - low * transposed(module, low, wp, s) \
        - high * transposed(module, high, wn, s)


def flat(module: nn.Module, a: torch.Tensor, R: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Flat rule: relevance spread uniformly over the receptive field."""
    f = module_forward(module)
    w, _ = parameters_of(module)
    ones_w = None if w is None else torch.ones_like(w)
    ones = torch.ones_like(a)
    s = R / stabilise(_z(f, ones, ones_w, None), eps)
    return transposed(module, ones, ones_w, s)


COMPOSITES: dict[str, dict[str, str]] = {
    "epsilon": {"first": "epsilon", "conv": "epsilon", "dense": "epsilon"},
    "epsilon_plus": {"first": "alpha_beta1", "conv": "alpha_beta1", "dense": "epsilon"},
    "epsilon_plus_flat": {"first": "flat", "conv": "alpha_beta1", "dense": "epsilon"},
    "epsilon_gamma_box": {"first": "zbox", "conv": "gamma", "dense": "epsilon"},
    "epsilon_alpha2_beta1": {"first": "alpha_beta", "conv": "alpha_beta", "dense": "epsilon"},
    "epsilon_alpha2_beta1_flat": {"first": "flat", "conv": "alpha_beta", "dense": "epsilon"},
    "gamma": {"first": "gamma", "conv": "gamma", "dense": "gamma"},
    "alpha_beta": {"first": "alpha_beta", "conv": "alpha_beta", "dense": "alpha_beta"},
    "zbox_epsilon": {"first": "zbox", "conv": "epsilon", "dense": "epsilon"},
}
"""Named composites: which rule the first layer, the other convolutions (and
transposed convolutions) and the dense (``nn.Linear``) layers use. ``alpha_beta1``
is alpha-beta with ``alpha = 1`` (z+). Names follow common usage (e.g. EpsilonPlus,
EpsilonGammaBox, EpsilonAlpha2Beta1 of Kohlbrenner et al. 2020, Towards Best
Practice in Explaining Neural Network Decisions with LRP, IJCNN)."""


def apply_rule(rule: str, module: nn.Module, a: torch.Tensor, R: torch.Tensor,
               options: dict[str, Any], y: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance at ``module``'s input by ``rule`` with ``options`` (eps, gamma, alpha, low, high);
    ``y``: the module's output in the forward pass (the epsilon rule's ``z``)."""
    eps = options["epsilon"]
    if rule == "epsilon":
        return epsilon(module, a, R, eps, z=y)
    if rule == "gamma":
        return epsilon(module, a, R, eps, gamma=options["gamma"])
    if rule == "alpha_beta":
        return alpha_beta(module, a, R, options["alpha"], eps)
    if rule == "alpha_beta1":
        return alpha_beta(module, a, R, 1.0, eps)
    if rule == "zbox":
        return zbox(module, a, R, options["low"], options["high"], eps)
    if rule == "flat":
        return flat(module, a, R, eps)
    raise ValueError(rule)
