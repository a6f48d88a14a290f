"""Layer methods on a layer inside a MONAI bundle's network under its sliding window: one copy per patch.

The bundle's sliding window (:class:`~esegeta_engine.forward.sliding.SlidingWindow`, equal to MONAI's)
runs the network once per patch of the preprocessed (network) grid, so a layer inside it has one
copy ``A_p`` per patch; the stitched output is linear in the patches' outputs, and the patch-wise
backward recomputes one patch batch at a time, so each copy has its ``G_p = dF/dA_p``. The copies'
maps combine on the network grid (:class:`~esegeta_engine.forward.patch_layer.LayerCanvas`: CAMs
blended with the window's importance map, additive maps summed) and go back to the scan's grid
through the bundle's inversion (``Invertd``), as the probabilities do.

``bundle_layer_map``
    the gradient methods (CAMs, gradient x activation); with ``scale`` every patch's copy is
    replaced by ``scale * A_p`` in the forward and in the recomputation: a point of a layer-space
    path (layer integrated gradients and internal influence from the zero activation of every
    copy, :mod:`.member_paths`), the input fixed.
``bundle_layer_forward``
    activation-only maps (layer activation): one forward of every patch without a graph, the copies
    blended like the CAMs. No stitched output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.forward.patch_layer import LayerCanvas, LayerCopy

GRID = "choose a convolutional layer (or its activation) of the encoder or decoder"


def _hook(layer: nn.Module, layer_input: bool, edit: Any) -> Any:
    if layer_input:
        def pre(m: nn.Module, args: tuple) -> tuple | None:
            new = edit(args[0] if args else None)
            return None if new is None else (new, *args[1:])
        return layer.register_forward_pre_hook(pre)
    return layer.register_forward_hook(lambda m, args, out: edit(out))


def bundle_layer_map(pipe: Any, score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor, target: int,
                     layer_input: bool, per_copy: Any, combine: str, method: str, name: str,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer method over every patch copy of a bundle's network under its sliding window, on the scan's grid.

    Returns the map ``(N, C', *scan)`` and, per example, the sum of every copy's layer map. With
    ``scale``, ``per_copy`` gets the unscaled ``A_p`` and the gradient at the scaled point.
    """
    if combine not in ("sum", "blend"):
        raise MethodError(f"method '{method}' is not built on layers inside a bundle's network",
                          "use layer_gradcam or layer_gradient_x_activation")
    sw = pipe.window
    copy = LayerCopy(layer_input)
    n = inputs.shape[0]
    totals = torch.zeros(n, dtype=torch.float64)
    canvas: list[LayerCanvas] = []

    def edit(a: Any) -> torch.Tensor | None:
        if not isinstance(a, torch.Tensor):
            return None
        new = a * scale if scale is not None else None
        if sw.recomputing:
            copy.keep(new if new is not None else a)
            if new is not None:
                copy.a = a.detach()
        return new

    def on_chunk(chunk: list[tuple[int, int]], grid: Any) -> None:
        if copy.calls != 1 or copy.a is None:
            raise MethodError(f"{method}: layer '{name}' ran {copy.calls} times for one patch batch",
                              "pick a layer the network runs exactly once per forward pass (`esegeta layers MODEL`)")
        a, g = copy.a, copy.g if copy.g is not None else torch.zeros_like(copy.a)
        copy.calls, copy.a, copy.g = 0, None, None
        if a.dim() != len(grid.roi) + 2:
            raise MethodError(f"method '{method}' needs a layer with a spatial grid, but layer '{name}' gives "
                              f"{tuple(a.shape)} per patch batch", GRID)
        maps = per_copy(a, g, chunk).float()
        for (b, _), m in zip(chunk, maps):
            totals[b] += float(m.double().sum())
        _place(canvas, grid, n, combine, method, chunk, maps)

    handle = _hook(layer, layer_input, edit)
    sw.on_backward_chunk = on_chunk
    try:
        x = inputs.detach().requires_grad_(True)
        with torch.enable_grad():  # hooked: the forward runs every patch (at the path point), never a reused output
            scores = score_model(x)[:, target]
            torch.autograd.grad(scores.sum(), x)
    finally:
        sw.on_backward_chunk = None
        handle.remove()
    return _to_scan(pipe, canvas, inputs), totals


def bundle_layer_forward(pipe: Any, score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor,
                         layer_input: bool, per_copy: Any, combine: str, method: str, name: str) -> torch.Tensor:
    """An activation-only layer map over every patch copy (one forward of every patch, no graph), on the scan's grid."""
    sw = pipe.window
    x = inputs.detach()
    n = x.shape[0]
    seen: list[torch.Tensor] = []
    canvas: list[LayerCanvas] = []

    def edit(a: Any) -> None:
        if isinstance(a, torch.Tensor):
            seen.append(a.detach())

    with torch.no_grad():
        items = [pipe.steps.preprocess(x[i], pipe.affine, pipe.meta) for i in range(n)]
    pipe._last = items
    data = [_plain(item[pipe.steps.key]).float() for item in items]
    if len({tuple(d.shape) for d in data}) != 1:
        raise MethodError(f"{method}: the scans explained together have different network grids",
                          "explain one scan at a time")
    batch = torch.stack(data)
    grid = sw.grid(batch.shape[2:], batch.device)
    xp = grid.pad_input(batch)
    handle = _hook(layer, layer_input, edit)
    try:
        with torch.no_grad():
            for chunk in sw.chunks(n, grid):
                seen.clear()
                sw.run_patches(torch.cat([xp[(slice(b, b + 1), slice(None), *grid.slices[p])] for b, p in chunk]))
                if len(seen) != 1:
                    raise MethodError(f"{method}: layer '{name}' ran {len(seen)} times for one patch batch",
                                      "pick a layer the network runs exactly once per forward pass")
                if seen[0].dim() != len(grid.roi) + 2:
                    raise MethodError(f"method '{method}' needs a layer with a spatial grid, but layer '{name}' "
                                      f"gives {tuple(seen[0].shape)} per patch batch", GRID)
                _place(canvas, grid, n, combine, method, chunk, per_copy(seen[0], chunk).float())
    finally:
        handle.remove()
    monitor = getattr(score_model, "monitor", None)
    if monitor is not None:  # one pass over the volume: one model evaluation, as the cost functions count
        monitor.evaluated(n)
    return _to_scan(pipe, canvas, inputs)


def _place(canvas: list[LayerCanvas], grid: Any, n: int, combine: str, method: str,
           chunk: list[tuple[int, int]], maps: torch.Tensor) -> None:
    if not canvas:
        canvas.append(LayerCanvas(grid, n, combine))
    elif canvas[0].grid is not grid:
        raise MethodError(f"{method}: the scans explained together have different network grids",
                          "explain one scan at a time")
    canvas[0].add(chunk, maps)


def _to_scan(pipe: Any, canvas: list[LayerCanvas], inputs: torch.Tensor) -> torch.Tensor:
    maps = []
    for b in range(inputs.shape[0]):
        item = pipe._last[min(b, len(pipe._last) - 1)]
        m = (canvas[0].result(torch.device("cpu"))[b] if canvas
             else torch.zeros((1, *item[pipe.steps.key].shape[1:])))
        maps.append(pipe.steps.invert_map(m, item))
    return torch.stack(maps).to(inputs.device)


def _plain(t: Any) -> torch.Tensor:
    from monai.data import MetaTensor

    return t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)
