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


class LayerCopy:
    """One call of a layer: its activation (or input) ``A`` and, after the backward, its gradient ``G``."""

    def __init__(self, layer_input: bool) -> None:
        self.layer_input = layer_input
        self.a: torch.Tensor | None = None
        self.g: torch.Tensor | None = None
        self.calls = 0

    def keep(self, a: Any) -> None:
        """Keep ``a`` (a tensor of the graph) and hook its gradient; anything else is ignored."""
        if not isinstance(a, torch.Tensor) or not a.requires_grad:
            return
        self.calls += 1
        self.a, self.g = a.detach(), None

        def grab(g: torch.Tensor) -> None:
            self.g = g.detach()
        a.register_hook(grab)


class _Capture(LayerCopy):
    """Forward hook on the layer: during the backward recomputation keep ``A`` and its gradient."""

    def __init__(self, sw: SlidingWindow, layer_input: bool) -> None:
        super().__init__(layer_input)
        self.sw = sw

    def pre(self, module: nn.Module, args: tuple) -> None:
        if self.sw.recomputing and self.layer_input and args:
            self.keep(args[0])

    def post(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.sw.recomputing and not self.layer_input:
            self.keep(out)


class LayerCanvas:
    """Every copy's layer map placed where its patch lies, and combined (module docstring).

    With ``on_layer_grid`` and a layer grid that lines up with every patch (each patch's start,
    the padded size and the crop are whole multiples of the layer's stride), the canvas is the
    scan's own layer grid (``size * layer / patch`` voxels per axis) and a copy's map is placed
    unchanged; the blend weights are the importance map resampled to the layer grid. Otherwise
    each map is interpolated to its patch on the input grid first, as Grad-CAM's maps are.

    Parameters
    ----------
    grid : WindowGrid
        The window grid of the explained input.
    n : int
        Rows (examples) of the canvas.
    combine : {"blend", "sum"}
        Weighted mean of overlapping copies, or their sum.
    on_layer_grid : bool
        Try the layer's own grid (Eigen-CAMs take their principal component there).
    """

    def __init__(self, grid: WindowGrid, n: int, combine: str, on_layer_grid: bool = False) -> None:
        self.grid, self.n, self.combine, self.on_layer_grid = grid, n, combine, on_layer_grid
        self.canvas: torch.Tensor | None = None
        self.layer_grid = self.resampled = False

    def _setup(self, maps: torch.Tensor) -> None:
        g = self.grid
        shape = tuple(maps.shape[2:])
        ratio = list(zip(shape, g.roi))
        edges = [[sl[a].start for sl in g.slices] + [g.padded[a], g.offset[a], g.spatial[a]]
                 for a in range(len(g.roi))]
        self.layer_grid = self.on_layer_grid and shape != g.roi and all(
            all(e * s % r == 0 for e in edges[a]) for a, (s, r) in enumerate(ratio))
        self.resampled = shape != g.roi and not self.layer_grid  # copies interpolated to the input grid
        if self.layer_grid:
            self.to_layer = lambda v, a: v * ratio[a][0] // ratio[a][1]
            self.size = shape
            self.weight = F.interpolate(g.weight, size=shape, mode=_mode(shape), align_corners=False)
        else:
            self.to_layer = lambda v, a: v
            self.size = g.roi
            self.weight = g.weight
        padded = tuple(self.to_layer(v, a) for a, v in enumerate(g.padded))
        self.slices = [tuple(slice(self.to_layer(s.start, a), self.to_layer(s.start, a) + self.size[a])
                             for a, s in enumerate(sl)) for sl in g.slices]
        self.canvas = torch.zeros((self.n, maps.shape[1], *padded), device=maps.device)
        if self.combine == "blend":
            self.count = torch.zeros((1, 1, *padded), device=maps.device)
            for sl in self.slices:
                self.count[(slice(None), slice(None), *sl)] += self.weight

    def add(self, chunk: list[tuple[int, int]], maps: torch.Tensor, move: tuple[int, ...] | None = None) -> None:
        """Place the maps ``(B, C', *layer grid)`` of one patch batch's ``(example, patch)`` items.

        ``move``: input voxels per axis the maps' content lies further along than where they are
        placed (a mirrored copy flipped back, :mod:`esegeta_engine.models.member_grid`). ``blend``
        moves it inside the patch (its cells take the patch's blend weights at their true place; the
        vacated edge takes the nearest value, as the interpolation does at a patch's edge); ``sum``
        places it moved on the canvas (what leaves the canvas is cut).
        """
        if self.canvas is None:
            self._setup(maps)
        assert self.canvas is not None
        if tuple(maps.shape[2:]) != self.size:
            maps = F.interpolate(maps, size=self.size, mode=_mode(self.size), align_corners=False)
        move = move if move is not None and any(move) else None
        if move is not None and self.layer_grid:
            raise ValueError("a moved copy is placed on the input grid, not on the layer grid")
        for (b, p), m in zip(chunk, maps):
            if self.combine == "blend":
                m = moved(m, move) if move is not None else m
                self.canvas[(b, slice(None), *self.slices[p])] += m * self.weight[0]
                continue
            sl = self.slices[p] if move is None else _moved_slices(self.slices[p], move, self.canvas.shape[2:])
            src = tuple(slice(None) for _ in sl) if move is None else tuple(
                slice(s.start - (o.start + v), s.stop - (o.start + v))
                for s, o, v in zip(sl, self.slices[p], move))
            self.canvas[(b, slice(None), *sl)] += m[(slice(None), *src)]

    def result(self, device: torch.device) -> torch.Tensor:
        """The combined map, cropped to the input (or its layer grid); zeros if nothing was placed."""
        g = self.grid
        if self.canvas is None:  # no patch is read by the target
            return torch.zeros((self.n, 1, *g.spatial), device=device)
        canvas = self.canvas / self.count if self.combine == "blend" else self.canvas
        if not any(g.pad):
            return canvas
        sl = tuple(slice(self.to_layer(o, a), self.to_layer(o + s, a))
                   for a, (o, s) in enumerate(zip(g.offset, g.spatial)))
        return canvas[(slice(None), slice(None), *sl)]


def moved(m: torch.Tensor, voxels: tuple[int, ...]) -> torch.Tensor:
    """``m`` ``(C, *spatial)`` with its content moved by ``voxels`` per axis; vacated voxels take the edge value."""
    for a, v in enumerate(voxels):
        if v:
            n = m.shape[a + 1]
            idx = (torch.arange(n, device=m.device) - v).clamp(0, n - 1)
            m = m.index_select(a + 1, idx)
    return m


def _moved_slices(sl: tuple[slice, ...], move: tuple[int, ...], size: tuple[int, ...]) -> tuple[slice, ...]:
    """A patch's slices moved by ``move``, cut to a canvas of ``size``."""
    return tuple(slice(max(s.start + v, 0), min(s.stop + v, n)) for s, v, n in zip(sl, move, size))


def _mode(size: tuple[int, ...]) -> str:
    return "bilinear" if len(size) == 2 else "trilinear"


def _check_grid(a: torch.Tensor, inputs: torch.Tensor, method: str, name: str) -> None:
    if a.dim() != inputs.dim():
        raise MethodError(
            f"method '{method}' needs a layer with a spatial grid under sliding-window execution, but "
            f"layer '{name}' gives {tuple(a.shape)} per patch",
            "choose a convolutional layer (or its activation) of the encoder or decoder")


def _once(calls: int, method: str, name: str) -> None:
    if calls != 1:
        raise MethodError(
            f"{method}: layer '{name}' ran {calls} times for one patch batch",
            "pick a layer the network runs exactly once per forward pass (`esegeta layers MODEL`)")


def _hooked(net: nn.Module) -> bool:
    """Whether any module of ``net`` carries a hook (one that may act in the stitched forward)."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or getattr(m, "_backward_pre_hooks", None) for m in net.modules())


def patchwise_layer_map(score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor, target: int,
                        layer_input: bool, per_patch: PerPatch, combine: str, method: str,
                        layer_name: str | None = None, on_layer_grid: bool = False,
                        report: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    on_layer_grid : bool
        Combine on the scan's layer grid where it lines up with the patches (:class:`LayerCanvas`).
    report : dict, optional
        Filled with ``resampled``: whether the copies had to be interpolated to the input grid.

    Returns
    -------
    tuple of torch.Tensor
        The map ``(N, C', *spatial)`` and, per example, the sum of every copy's layer map
        (float64).
    """
    sw = score_model.runner
    if not isinstance(sw, SlidingWindow):
        # a deployed pipeline (nnU-Net, a bundle) runs the layer once per member itself
        members = getattr(getattr(getattr(score_model, "net", None), "model", None), "member_layer_map", None)
        if callable(members):
            return members(score_model, layer, inputs, target, layer_input, per_patch, combine, method,
                           layer_name or type(layer).__name__)
        raise TypeError("patchwise_layer_map needs a sliding-window score model")
    n = inputs.shape[0]
    grid = sw.grid(inputs.shape[2:], inputs.device)
    capture = _Capture(sw, layer_input)
    total = torch.zeros(n, dtype=torch.float64)
    canvas = LayerCanvas(grid, n, combine if combine != "none" else "sum", on_layer_grid)
    name = layer_name or type(layer).__name__

    def on_chunk(chunk: list[tuple[int, int]], g: WindowGrid) -> None:
        _once(capture.calls, method, name)
        a = capture.a
        assert a is not None
        grad = capture.g if capture.g is not None else torch.zeros_like(a)
        capture.calls = 0
        _check_grid(a, inputs, method, name)
        maps = per_patch(a, grad, chunk).float()
        if combine == "none":
            return
        for (b, _), m in zip(chunk, maps):
            total[b] += float(m.double().sum())
        canvas.add(chunk, maps)

    # the capture acts only in the backward's recomputation: unless other hooks (guided rules) need the
    # stitched forward, it runs without a graph, or is the prediction's own output (no patch runs twice)
    plain_before = sw.plain_forward
    sw.plain_forward = plain_before or not _hooked(sw.net)
    handles = [layer.register_forward_pre_hook(capture.pre), layer.register_forward_hook(capture.post)]
    sw.on_backward_chunk = on_chunk
    try:
        x = inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = score_model(x)[:, target]
            torch.autograd.grad(scores.sum(), x)
    finally:
        sw.on_backward_chunk = None
        sw.plain_forward = plain_before
        for h in handles:
            h.remove()
    if report is not None:
        report["resampled"] = canvas.resampled
    return canvas.result(inputs.device), total


LayerOnly = Callable[[torch.Tensor, list[tuple[int, int]]], torch.Tensor]
"""``per_patch(A, items) -> (B, C', *layer grid)``: maps from one patch batch's activations."""


def patchwise_layer_forward(score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor, layer_input: bool,
                            per_patch: LayerOnly, combine: str, method: str, layer_name: str | None = None,
                            on_layer_grid: bool = False, report: dict | None = None) -> torch.Tensor:
    """Like :func:`patchwise_layer_map` for methods that read activations only (no target, no
    gradient): each patch batch runs forward once, without a graph, and its copies' maps are
    combined on a :class:`LayerCanvas`. The network's outputs are not stitched."""
    sw = score_model.runner
    if not isinstance(sw, SlidingWindow):
        # a deployed pipeline (nnU-Net) runs the layer once per member itself
        members = getattr(getattr(getattr(score_model, "net", None), "model", None), "member_layer_forward", None)
        if callable(members):
            return members(score_model, layer, inputs, layer_input, per_patch, combine, method,
                           layer_name or type(layer).__name__)
        raise TypeError("patchwise_layer_forward needs a sliding-window score model")
    n = inputs.shape[0]
    grid = sw.grid(inputs.shape[2:], inputs.device)
    canvas = LayerCanvas(grid, n, combine, on_layer_grid)
    name = layer_name or type(layer).__name__
    seen: list[torch.Tensor] = []

    def keep(a: Any) -> None:
        if isinstance(a, torch.Tensor):
            seen.append(a.detach())

    handle = (layer.register_forward_pre_hook(lambda m, args: keep(args[0] if args else None)) if layer_input
              else layer.register_forward_hook(lambda m, args, out: keep(out)))
    xp = grid.pad_input(inputs.detach())
    try:
        with torch.no_grad():
            for chunk in sw.chunks(n, grid):
                seen.clear()
                sw.run_patches(torch.cat([xp[(slice(b, b + 1), slice(None), *grid.slices[p])] for b, p in chunk]))
                _once(len(seen), method, name)
                _check_grid(seen[0], inputs, method, name)
                canvas.add(chunk, per_patch(seen[0], chunk).float())
    finally:
        handle.remove()
    monitor = getattr(score_model, "monitor", None)
    if monitor is not None:  # one pass over the volume: one model evaluation, as the cost functions count
        monitor.evaluated(n)
    if report is not None:
        report["resampled"] = canvas.resampled
    return canvas.result(inputs.device)
