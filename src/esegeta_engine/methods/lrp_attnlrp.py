"""AttnLRP's attention rule (Achtibat et al. 2024, AttnLRP: Attention-Aware Layer-wise Relevance
Propagation for Transformers, ICML): relevance to the queries and keys too.

The held-probability rule of Ali et al. 2022 (:mod:`.lrp_attention`) sends relevance through the
attention values only. AttnLRP keeps the softmax in the explanation, one operation at a time:

output projection ``y = W_o o + b_o``
    the epsilon rule.
``o = P v`` (a bilinear product of two input-dependent factors)
    the uniform rule (their Eq. 7 with the epsilon rule of the sum over the shared index):
    ``R(P_ji) = sum_d P_ji v_id R_jd / (2 o_jd)``, ``R(v_id) = sum_j P_ji v_id R_jd / (2 o_jd)``;
    each factor gets half, so the pair conserves ``R``.
softmax ``P = softmax(L)``
    the first-order Taylor decomposition at ``L`` (their Proposition 3.1),
    ``R(L_i) = L_i (R_i - P_i sum_j R_j)``; its bias term absorbs the rest (softmax is not
    conservative). Masked logits (``-inf``) get none.
logits ``L = scale q k^T + B``
    the epsilon rule of the sum: a relative position bias or a window/causal mask ``B`` absorbs
    its share; ``q k^T`` is bilinear again: the uniform rule, half to the queries, half to the keys.
``q, k, v`` from the tokens by linear maps
    the epsilon rule, and the three shares add at the tokens.

:func:`attention` runs that backward for one attention call given its ``q, k, v`` (as functions of
the tokens), the extra logits ``B`` and the output projection; :mod:`.lrp_attention` (MONAI's
``SABlock``) and :mod:`.lrp_swin` (``WindowAttention``) call it with their blocks' pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from esegeta_engine.methods.lrp_rules import stabilise

Heads = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]


def softmax_rule(logits: torch.Tensor, probs: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """AttnLRP's softmax rule over the last axis: ``L (R - P sum R)`` (masked ``-inf`` logits: 0)."""
    finite = torch.where(torch.isneginf(logits), torch.zeros_like(logits), logits)
    return finite * (R - probs * R.sum(dim=-1, keepdim=True))


def bilinear_rule(a: torch.Tensor, b: torch.Tensor, R: torch.Tensor, eps: float,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform rule on ``a @ b`` (batched): each factor gets half of ``R``, shared by the epsilon rule."""
    out = a @ b if out is None else out
    s = R / (2 * stabilise(out, eps))
    return a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s)


def attention(x: torch.Tensor, R: torch.Tensor, eps: float, heads: Heads, scale: float,
              extra: torch.Tensor | None, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """AttnLRP's relevance at the tokens ``x`` of one attention call, given ``R`` at its output.

    Parameters
    ----------
    x : torch.Tensor
        The tokens ``(batch, n, c)``.
    R : torch.Tensor
        Relevance at the block's output.
    eps : float
        The epsilon of the linear and bilinear rules.
    heads : callable
        ``x -> (q, k, v)``, each ``(batch, heads, n, d)``, differentiable in ``x``.
    scale : float
        The logits' factor on ``q k^T``.
    extra : torch.Tensor or None
        Added to the logits (relative position bias, masks as ``-inf`` or large negative values),
        broadcastable to ``(batch, heads, n, n)``.
    project : callable
        ``o -> y`` from the heads' outputs ``(batch, heads, n, d)`` to the block's output.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        q, k, v = heads(x)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    with torch.no_grad():
        S = (qd @ kd.transpose(-2, -1)) * scale
        L = S if extra is None else S + extra.to(S.dtype)
        P = L.softmax(dim=-1).to(vd.dtype)
        o = P @ vd
    o_in = o.requires_grad_(True)
    with torch.enable_grad():
        y = project(o_in)
        (g,) = torch.autograd.grad(y, o_in, R / stabilise(y.detach(), eps))
    with torch.no_grad():
        R_P, R_v = bilinear_rule(P, vd, o * g, eps, out=o)
        R_L = softmax_rule(L, P.to(L.dtype), R_P.to(L.dtype))
        R_S = R_L if extra is None else S * R_L / stabilise(L, eps)
        t = R_S / (2 * stabilise(S, eps))
        R_q = qd * ((t @ kd) * scale)
        R_k = kd * ((t.transpose(-2, -1) @ qd) * scale)
    with torch.enable_grad():
        (gx,) = torch.autograd.grad((q, k, v), x, tuple(r / stabilise(z, eps) for r, z in
                                                      ((R_q, qd), (R_k, kd), (R_v, vd))))
    return x.detach() * gx
