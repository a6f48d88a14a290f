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

from typing import Any

import torch
from torch import nn

from esegeta_engine.methods.lrp_linear import (  # noqa: F401  (re-exported: the rules' primitives)
    TINY, Forward, module_forward, parameters_of, stabilise, transposed, vjp, z_of)
from esegeta_engine.methods.lrp_signed import contribution_sums, divide_stabilised, split_back

RULES = ("epsilon", "gamma", "alpha_beta", "zbox", "flat")


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
        z = z_of(f, a, w, b)
    s = R / stabilise(z.detach(), eps)
    return a * transposed(module, a, w, s)


def alpha_beta(module: nn.Module, a: torch.Tensor, R: torch.Tensor, alpha: float = 2.0,
               eps: float = 1e-6, y: torch.Tensor | None = None) -> torch.Tensor:
    """Alpha-beta rule with ``beta = alpha - 1`` (inputs of either sign; ``alpha = 1``: z+).

    ``y``: the module's own output ``f(a)`` from the forward pass, which gives the sums of
    positive and negative contributions with one more module call (:mod:`.lrp_signed`).
    """
    w, b = parameters_of(module)
    beta = alpha - 1.0
    if w is None:  # average pooling: every weight positive
        return epsilon(module, a, R, eps)
    if y is not None and (y.dtype != a.dtype or y.shape != R.shape):
        y = None
    with torch.no_grad():
        a = a.detach()
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        sums = contribution_sums(module, a, w, b, y, (1,) if beta == 0 else (1, -1))
        # relevance sent through contributions w+ a+ and w- a- (positive), w- a+ and w+ a- (negative)
        out = split_back(module, a, wp, wn, divide_stabilised(R, sums[0], eps))
        if alpha != 1:
            out.mul_(alpha)
        if beta == 0:
            return out
        return out.sub_(split_back(module, a, wn, wp, divide_stabilised(R, sums[1], eps)), alpha=beta)


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
    z = z_of(f, a, w, b) - z_of(f, low, wp, None) - z_of(f, high, wn, None)
    s = R / stabilise(z, eps)
    return a * transposed(module, a, w, s) - low * transposed(module, low, wp, s) \
        - high * transposed(module, high, wn, s)


def flat(module: nn.Module, a: torch.Tensor, R: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Flat rule: relevance spread uniformly over the receptive field."""
    f = module_forward(module)
    w, _ = parameters_of(module)
    ones_w = None if w is None else torch.ones_like(w)
    ones = torch.ones_like(a)
    s = R / stabilise(z_of(f, ones, ones_w, None), eps)
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
    ``y``: the module's output in the forward pass (the epsilon rule's ``z``; the alpha-beta rules'
    sums of contributions come from it)."""
    eps = options["epsilon"]
    if rule == "epsilon":
        return epsilon(module, a, R, eps, z=y)
    if rule == "gamma":
        return epsilon(module, a, R, eps, gamma=options["gamma"])
    if rule == "alpha_beta":
        return alpha_beta(module, a, R, options["alpha"], eps, y=y)
    if rule == "alpha_beta1":
        return alpha_beta(module, a, R, 1.0, eps, y=y)
    if rule == "zbox":
        return zbox(module, a, R, options["low"], options["high"], eps)
    if rule == "flat":
        return flat(module, a, R, eps)
    raise ValueError(rule)
