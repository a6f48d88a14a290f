"""Layer methods under sliding-window execution: one layer, once per patch.

A layer of a network run by sliding window exists once per patch. With the
stitched score ``F(x) = T(sum_p w_p f(x_p) / W)``, patch ``p``'s copy of the layer
has activation ``A_p`` and gradient ``G_p = dF/dA_p``, which carries the patch's
blended share ``w_p / W`` of the upstream gradient. :func:`patchwise_layer_map`
runs the patch-wise backward of :mod:`.sliding` (one patch batch's graph alive at a
time) and hands each patch's ``(A_p, G_p)`` to a method's ``per_patch`` function,
which returns that copy's layer map; the maps are brought to the patch's input
grid (the interpolation layer maps get anyway) and combined:

``blend`` (CAMs)
    ``M(u) = sum_p w_p(u) up(m_p)(u) / W(u)``: the copies' maps stitched exactly as
    the network's outputs are (each copy's CAM weights from its own ``A_p``, ``G_p``).
``sum`` (additive attributions: gradient x activation, conductance, excitation)
    ``M(u) = sum_p up(m_p)(u)``: the copies' attributions add where copies overlap
    (each interpolated to the input grid as the whole-volume method's map is). The
    exact total on the layer, ``sum_p sum m_p``, is returned too (completeness of the
    stitched function; the interpolated map does not keep sums).

The layer is read during each patch batch's forward recomputation only; any other hooks
the method set on the network (excitation backprop's rules) fire as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.forward.sliding import SlidingWindow, WindowGrid

PerPatch = Callable[[torch.Tensor, torch.Tensor, list[tuple[int, int]]], torch.Tensor]
"""``per_patch(A, G, items) -> (B, 1 or C, *layer grid)``: the layer maps of one patch batch whose
``(example, patch)`` items are given."""


class _Capture:
    """Forward hook on the layer: during the backward recomputation keep ``A`` and its gradient."""

    def __init__(self, sw: SlidingWindow, layer_input: bool) -> None:
        self.sw, self.layer_input = sw, layer_input
        self.a: torch.Tensor | None = None
        self.g: torch.Tensor | None = None
        self.calls = 0

    def _keep(self, a: Any) -> None:
        if not isinstance(a, torch.Tensor) or not a.requires_grad:
            return
        self.calls += 1
        self.a = a.detach()
        self.g = None

        def grab(g: torch.Tensor) -> None:
            self.g = g.detach()
        a.register_hook(grab)

    def pre(self, module: nn.Module, args: tuple) -> None:
        if self.sw.recomputing and self.layer_input and args:
            self._keep(args[0])

    def post(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.sw.recomputing and not self.layer_input:
            self._keep(out)


def patchwise_layer_map(score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor, target: int,
                        layer_input: bool, per_patch: PerPatch, combine: str, method: str,
                        layer_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input-grid map of a layer method over every patch copy of ``layer``.

    Parameters
    ----------
    score_model : ScoreModel
        A sliding-window score model (``score_model.runner`` is a :class:`SlidingWindow`).
    layer : nn.Module
        The layer (inside the network the window runs).
    inputs : torch.Tensor
        ``(N, C, *spatial)``.
    target : int
        The explained score.
    layer_input : bool
        Read the layer's input instead of its output.
    per_patch : callable
        ``per_patch(A, G)`` for one patch batch (see :data:`PerPatch`).
    combine : {"blend", "sum", "none"}
        How the copies' maps combine (module docstring); ``none``: only ``per_patch`` runs (a
        method collecting over several passes).
    method, layer_name : str
        For messages.

    Returns
    -------
    tuple of torch.Tensor
        The map ``(N, C', *spatial)`` and, per example, the sum of every copy's layer map
        (float64).
    """
    sw = score_model.runner
    if not isinstance(sw, SlidingWindow):
        raise TypeError("patchwise_layer_map needs a sliding-window score model")
    n = inputs.shape[0]
    grid = sw.grid(inputs.shape[2:], inputs.device)
    capture = _Capture(sw, layer_input)
    state: dict[str, Any] = {"canvas": None, "total": torch.zeros(n, dtype=torch.float64)}
    name = layer_name or type(layer).__name__

    def on_chunk(chunk: list[tuple[int, int]], g: WindowGrid) -> None:
        if capture.calls != 1 or capture.a is None:
            raise MethodError(
                f"{method}: layer '{name}' ran {capture.calls} times for one patch batch",
                "pick a layer the network runs exactly once per forward pass (`esegeta layers MODEL`)")
        a = capture.a
        grad = capture.g if capture.g is not None else torch.zeros_like(a)
        capture.calls = 0
        if a.dim() != inputs.dim():
            raise MethodError(
                f"method '{method}' needs a layer with a spatial grid under sliding-window execution, but "
                f"layer '{name}' gives {tuple(a.shape)} per patch",
                "choose a convolutional layer (or its activation) of the encoder or decoder")
        maps = per_patch(a, grad, chunk).float()
        if combine == "none":
            return
        for (b, _), m in zip(chunk, maps):
            state["total"][b] += float(m.double().sum())
        mode = "bilinear" if len(g.roi) == 2 else "trilinear"
        up = maps if tuple(maps.shape[2:]) == g.roi else F.interpolate(maps, size=g.roi, mode=mode,
                                                                      align_corners=False)
        if state["canvas"] is None:
            state["canvas"] = torch.zeros((n, up.shape[1], *g.padded), device=inputs.device)
        for (b, p), m in zip(chunk, up):
            place = (b, slice(None), *g.slices[p])
            state["canvas"][place] += m * g.weight[0] if combine == "blend" else m

    handles = [layer.register_forward_pre_hook(capture.pre), layer.register_forward_hook(capture.post)]
    sw.on_backward_chunk = on_chunk
    try:
        x = inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = score_model(x)[:, target]
            torch.autograd.grad(scores.sum(), x)
    finally:
        sw.on_backward_chunk = None
        for h in handles:
            h.remove()
    canvas = state["canvas"]
    if canvas is None:  # no patch is read by the target
        canvas = torch.zeros((n, 1, *grid.padded), device=inputs.device)
    if combine == "blend":
        canvas = canvas / grid.count
    return grid.crop(canvas), state["total"]
