"""FullGrad: input-gradient plus every layer's bias-gradient (Srinivas & Fleuret 2019).

For a network built from convolutions, linear layers, batch norm (eval mode),
ReLUs and pooling, the score is exactly

    f(x) = sum(grad_x f * x) + sum over layers l, channels c, voxels i of b_lc * dF/dz_lci

with ``z_l`` the output of layer ``l`` (whose bias ``b_l`` is added at every
voxel). FullGrad maps each term to the input grid. With ``postprocess:
abs_normalise`` (the paper's saliency) each term is ``|.|``, min-max rescaled
per input and layer, interpolated to the input grid and summed over channels.
With ``postprocess: none`` the signed channel sums are interpolated with their
total kept (integer upsampling factors keep it exactly; a linear layer's
scalar term is spread evenly), so the map sums to ``f(x)`` — the completeness
identity above.

Biases: Conv/ConvTranspose/Linear biases, the implicit bias
``beta - gamma * mean / sqrt(var + eps)`` of BatchNorm in eval mode, and the
``beta`` of affine Group/InstanceNorm (input-dependent normalisation, so the
identity no longer holds exactly there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.methods.notes import add_note, notes_of
from esegeta_engine.methods.registry import Call, MethodContext, MethodSpec, Param, register

_WITH_BIAS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.Linear, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The per-channel bias ``module`` adds to its output, or ``None`` if it has none."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_mean is None or module.running_var is None:
            return None  # normalised with batch statistics: no fixed bias
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -module.running_mean * scale
        return bias + module.bias if module.bias is not None else bias
    if isinstance(module, _WITH_BIAS) and getattr(module, "bias", None) is not None:
        return module.bias
    return None


def _to_grid(term: torch.Tensor, size: tuple[int, ...], keep_total: bool) -> torch.Tensor:
    """A ``(N, 1, *grid)`` or ``(N, 1)`` term on the input grid ``size``."""
    n = term.shape[0]
    voxels = float(torch.tensor(size).prod())
    if term.dim() == 2:  # no grid (linear layer): spread evenly
        spread = term / voxels if keep_total else term
        return spread.reshape(n, 1, *([1] * len(size))).expand(n, 1, *size)
    if tuple(term.shape[2:]) == size:
        return term
    mode = "bilinear" if len(size) == 2 else "trilinear"
    if term.dim() != len(size) + 2:  # other ranks (e.g. 1D sequences): reduce to a scalar
        return _to_grid(term.flatten(2).sum(-1), size, keep_total)
    out = F.interpolate(term, size=size, mode=mode, align_corners=False)
    if keep_total:
        out = out * (float(torch.tensor(term.shape[2:]).prod()) / voxels)
    return out


def abs_normalise(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    flat = t.flatten(1)
    lo = flat.amin(1).reshape(-1, *([1] * (t.dim() - 1)))
    t = t - lo
    hi = t.flatten(1).amax(1).reshape(-1, *([1] * (t.dim() - 1)))
    return t / (hi + 1e-6)


class FullGrad:
    """FullGrad saliency of ``ctx.score_model`` (Captum's ``attribute`` shape)."""

    def __init__(self, ctx: MethodContext, postprocess: str) -> None:
        self.ctx, self.postprocess = ctx, postprocess

    def attribute(self, inputs: torch.Tensor, target: int = 0) -> torch.Tensor:
        """Return the input-grid map ``(N, 1, *spatial)`` of class ``target``."""
        biased = [(m, b) for m in self.ctx.score_model.modules()
                  if (b := effective_bias(m)) is not None]
        if getattr(self.ctx.score_model, "patchwise", False):
            from esegeta_engine.methods.fullgrad_patchwise import patchwise_fullgrad

            return patchwise_fullgrad(self.ctx, biased, inputs, target, self.postprocess == "none")
        grads: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(biased))}
        handles = []

        def hook_for(i: int):  # noqa: ANN202 - a forward hook
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    out.register_hook(lambda g: grads[i].append(g.detach()))
            return hook

        x = inputs.detach().clone().requires_grad_(True)
        try:
            for i, (m, _) in enumerate(biased):
                handles.append(m.register_forward_hook(hook_for(i)))
            with torch.enable_grad():
                score = self.ctx.score_model(x)[:, target]
                (grad_x,) = torch.autograd.grad(score.sum(), x)
        finally:
            for h in handles:
                h.remove()
        size = tuple(inputs.shape[2:])
        raw = self.postprocess == "none"
        term = grad_x * x.detach()
        total = (term.sum(1, keepdim=True) if raw else abs_normalise(term).sum(1, keepdim=True))
        spread: list[str] = []
        for i, (module, bias) in enumerate(biased):
            for g in grads[i]:  # one per call of the module
                summed = bias_term(module, bias, g, raw, len(size))
                if summed.dim() == 2 and g.dim() > 2:
                    spread.append(type(module).__name__)
                total = total + _to_grid(summed, size, keep_total=raw)
        if spread:
            add_note(notes_of(self.ctx), (
                f"fullgrad: {len(spread)} bias term(s) of layers without a voxel grid "
                f"({', '.join(sorted(set(spread)))}, "
                "e.g. a transformer's token features) have no location in the volume and are spread evenly over it"))
        return total.detach()


def bias_term(module: nn.Module, bias: torch.Tensor, g: torch.Tensor, raw: bool, spatial_dims: int) -> torch.Tensor:
    """One layer's bias-gradient term ``b * dF/dz``, summed over the bias's axis.

    Convolutions and norms add their bias along the channel axis (1); a linear layer along the
    last axis, whatever comes before it (a transformer's ``(N, tokens, features)``). Returns
    ``(N, 1, *grid)`` for a term on a spatial grid, else ``(N, 1)`` (its total).
    """
    axis = g.dim() - 1 if isinstance(module, nn.Linear) else 1
    shape = [1] * g.dim()
    shape[axis] = -1
    per_unit = g * bias.detach().to(g.dtype).reshape(shape)
    summed = (per_unit if raw else abs_normalise(per_unit)).sum(axis, keepdim=True)
    if axis == 1 and summed.dim() == spatial_dims + 2:
        return summed
    return summed.reshape(summed.shape[0], -1).sum(1, keepdim=True)


register(MethodSpec(
    name="fullgrad", family="gradient", title="FullGrad",
    summary="input-gradient x input plus the bias-gradients of every layer, on the input grid "
            "(signed terms sum to the score for ReLU networks with biases)",
    params=(Param("postprocess", "str", "abs_normalise",
                  "abs_normalise: the paper's saliency (|term| rescaled per layer); none: signed "
                  "terms that sum to the score", choices=("abs_normalise", "none")),),
    build=lambda ctx, p: Call(FullGrad(ctx, p["postprocess"])), needs_hooks=True,
    reference="Srinivas & Fleuret 2019, Full-Gradient Representation for Neural Network "
              "Visualization, NeurIPS, arXiv:1905.00780",
    patchwise="gradient", cost=lambda info, p: 2 if info.patchwise and p["postprocess"] != "none" else 1,
    axiom="conservation"))
