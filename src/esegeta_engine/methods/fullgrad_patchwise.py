"""FullGrad under sliding-window execution: every patch copy's bias-gradient terms, placed and added.

For a piecewise-linear network with biases the stitched score ``F(x) = T(sum_p w_p f(x_p) / W)``
(``T`` linear, e.g. a region sum) is ``F(x) = sum_u x(u) dF/dx(u) + sum_p sum_l b_l . G_pl`` with
``G_pl`` the gradient at copy ``p`` of layer ``l`` (its blended share of the upstream gradient).
The input term comes from the patch-wise input gradient; each copy's bias term is taken in the
patch-wise backward (:mod:`esegeta_engine.forward.sliding`), brought to its patch's input grid
and added where patches overlap:

``postprocess: none``
    each copy's channel sum, upsampled keeping its total: the map sums to ``F(x)``.
``postprocess: abs_normalise``
    the paper's min-max rescaling of ``|b . G|`` over the whole layer, i.e. over every copy of
    that layer (per call of the module and per input): a first patch-wise pass finds each
    layer's minimum and maximum over all copies, the second maps the copies (two passes).

A term without a voxel grid (a linear layer over a transformer's tokens) is spread evenly over
its patch, and the map's notes say so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from esegeta_engine.forward.patch_layer import LayerCanvas
from esegeta_engine.methods.fullgrad import abs_normalise
from esegeta_engine.methods.lrp import quiet_stitched_forward
from esegeta_engine.methods.notes import add_note, notes_of
from esegeta_engine.methods.registry import MethodContext

Key = tuple[int, int]  # (biased module, its call within a patch batch)


def patchwise_fullgrad(ctx: MethodContext, biased: list[tuple[nn.Module, torch.Tensor]], inputs: torch.Tensor,
                       target: int, raw: bool) -> torch.Tensor:
    """FullGrad ``(N, 1, *spatial)`` of the stitched score (module docstring)."""
    sw = ctx.score_model.runner
    n, dims = inputs.shape[0], inputs.dim() - 2
    grid = sw.grid(inputs.shape[2:], inputs.device)
    pending: list[tuple[Key, torch.Tensor]] = []
    counts: dict[int, int] = {}

    def hook_for(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if sw.recomputing and isinstance(out, torch.Tensor) and out.requires_grad:
                c = counts.get(i, 0)
                counts[i] = c + 1
                out.register_hook(lambda g, key=(i, c): pending.append((key, g.detach())))
        return hook

    def terms() -> Iterator[tuple[Key, int, torch.Tensor]]:
        for key, g in pending:
            module, bias = biased[key[0]]
            axis = g.dim() - 1 if isinstance(module, nn.Linear) else 1
            shape = [1] * g.dim()
            shape[axis] = -1
            yield key, axis, g * bias.detach().to(g.dtype).reshape(shape)

    def backward(on_chunk: Callable[[list[tuple[int, int]]], None]) -> torch.Tensor:
        handles = [m.register_forward_hook(hook_for(i)) for i, (m, _) in enumerate(biased)]

        def done(chunk: list[tuple[int, int]], g: Any) -> None:
            on_chunk(chunk)
            pending.clear()
            counts.clear()

        sw.on_backward_chunk = done
        try:
            x = inputs.detach().clone().requires_grad_(True)
            with torch.enable_grad(), quiet_stitched_forward(ctx.score_model):  # hooks act in the recomputation
                score = ctx.score_model(x)[:, target]
                (grad_x,) = torch.autograd.grad(score.sum(), x)
        finally:
            sw.on_backward_chunk = None
            for h in handles:
                h.remove()
        return grad_x

    bounds: dict[tuple[Key, int], tuple[float, float]] = {}
    if not raw:
        def collect(chunk: list[tuple[int, int]]) -> None:
            for key, _, t in terms():
                for (b, _), ti in zip(chunk, t.abs()):
                    lo, hi = float(ti.min()), float(ti.max())
                    old = bounds.get((key, b))
                    bounds[(key, b)] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)
        backward(collect)

    canvas = LayerCanvas(grid, n, "sum")
    roi_voxels = math.prod(grid.roi)
    spread: set[str] = set()

    def place(chunk: list[tuple[int, int]]) -> None:
        for key, axis, t in terms():
            if raw:
                s = t.sum(axis, keepdim=True)
            else:
                lo = torch.tensor([bounds[(key, b)][0] for b, _ in chunk], dtype=t.dtype, device=t.device)
                hi = torch.tensor([bounds[(key, b)][1] for b, _ in chunk], dtype=t.dtype, device=t.device)
                shape = (-1, *([1] * (t.dim() - 1)))
                s = ((t.abs() - lo.reshape(shape)) / (hi - lo + 1e-6).reshape(shape)).sum(axis, keepdim=True)
            if axis == 1 and s.dim() == dims + 2:
                canvas.add(chunk, s * (math.prod(s.shape[2:]) / roi_voxels) if raw else s)
                continue
            total = s.reshape(len(chunk), -1).sum(1)
            value = total / roi_voxels if raw else total
            canvas.add(chunk, value.reshape(-1, 1, *([1] * dims)).expand(-1, 1, *grid.roi))
            spread.add(type(biased[key[0]][0]).__name__)

    grad_x = backward(place)
    term = grad_x * inputs.detach()
    result = term.sum(1, keepdim=True) if raw else abs_normalise(term).sum(1, keepdim=True)
    if spread:
        add_note(notes_of(ctx), (
            f"fullgrad: bias terms of layers without a voxel grid ({', '.join(sorted(spread))}, e.g. a "
            "transformer's token features) have no location in the volume and are spread evenly over their patch"))
    return (result + canvas.result(inputs.device)).detach()
