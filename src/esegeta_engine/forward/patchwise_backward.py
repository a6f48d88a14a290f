"""The patch-wise backward of the sliding window, and targets read patch by patch.

:func:`patchwise_backward` is the loop of :class:`~esegeta_engine.forward.sliding._PatchwiseFunction`'s
backward: each patch batch is recomputed with a graph and back-propagates its blended share of the
stitched output's gradient, ``upstream(b, p) * w / W`` over the patch; only one patch batch's graph is
alive at a time. The upstream comes from a function of ``(example, patch)``, so a caller that knows it
patch by patch (:class:`LinearScore`) never holds the stitched output's gradient for the whole scan.

:class:`LinearScore` is a target that weighs the stitched output with fixed weights
(:func:`linear_weights`: the frozen argmax region, an ROI mask, without an activation):
``F_c = sum_v out[c, v] * M[c, v]``. Its gradient over a patch is ``M`` there (class ``c``'s
channel), and its score adds up patch by patch, ``sum_p sum_v y_p * w / W * M``, where the stitched
function adds ``(sum_p y_p * w) / W`` first: the same sum in another order (float rounding apart), with no
whole-scan output. DeepLIFT uses both (:mod:`esegeta_engine.methods.deeplift_twopass`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from esegeta_engine.forward.window_grid import WindowGrid
from esegeta_engine.targets import ArgmaxRegionTarget, RegionOfInterestTarget, Target, _one_hot

Weights = Callable[[int, tuple[slice, ...], int], torch.Tensor]
"""``weights(example, window, classes) -> (1, classes, *window)`` float32: ``M`` over a window of the output grid."""

Upstream = Callable[[int, int], torch.Tensor]
"""``upstream(example, patch) -> (1, K, *patch)``: the stitched output's gradient over that patch's window
(padded grid), not yet divided by the count map."""


def patchwise_backward(sw, grid: WindowGrid, x: torch.Tensor, upstream: Upstream) -> torch.Tensor:
    """The gradient of the stitched function at ``x`` for the given upstream, patch batch by patch batch.

    Parameters
    ----------
    sw : SlidingWindow
        The window (its network, patch batches, ``before_recompute`` / ``on_backward_chunk`` callbacks).
    grid : WindowGrid
        The patches of ``x``'s size.
    x : torch.Tensor
        The input ``(N, C, *spatial)``.
    upstream : callable
        ``upstream(b, p)``: see :data:`Upstream`.

    Returns
    -------
    torch.Tensor
        ``x``'s gradient, float32, of ``x``'s shape.
    """
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        xp = grid.pad_input(xr)
        gpad = torch.zeros_like(xp)
        xp_d = xp.detach()
        for chunk in sw.chunks(x.shape[0], grid):
            patch = torch.cat([xp_d[(slice(b, b + 1), slice(None), *grid.slices[p])] for b, p in chunk])
            patch.requires_grad_(True)
            if sw.before_recompute is not None:
                sw.before_recompute(chunk, grid)
            sw.recomputing = True
            try:
                y = sw._run_chunk(patch, True)
            finally:
                sw.recomputing = False
            share = torch.cat([upstream(b, p) / grid.count_at(p) for b, p in chunk])
            (g,) = torch.autograd.grad(y, patch, share * grid.weight)
            for (b, p), gi in zip(chunk, g):
                gpad[(b, slice(None), *grid.slices[p])] += gi
            del y, g, patch
            if sw.on_backward_chunk is not None:
                sw.on_backward_chunk(chunk, grid)
        (gx,) = torch.autograd.grad(xp, xr, gpad) if xp is not xr else (gpad,)
    return gx


def linear_weights(target: Target) -> Weights | None:
    """``M`` of a target whose scores are fixed weights of the output, else ``None``.

    Linear: the frozen argmax region (its one-hot) and the region-of-interest mask, each without an
    activation (exactly these classes, not subclasses, which may score otherwise). Every other target
    takes the fallback, the stitched output and autograd through the target: an activation (softmax,
    sigmoid) mixes the classes per voxel, the Otsu and the unfrozen argmax regions move with the output,
    the voxel and layer-channel targets are left to it as they read little of the output.
    """
    if type(target) is ArgmaxRegionTarget and target.activation_name == "none" and target.frozen \
            and target.region.numel():
        region = target.region

        def onehot(b: int, window: tuple[slice, ...], classes: int) -> torch.Tensor:
            k = b % region.shape[0]
            return _one_hot(region[(slice(k, k + 1), *window)], classes, torch.float32)

        return onehot
    if type(target) is RegionOfInterestTarget and target.activation_name == "none":
        mask = target.mask

        def masked(b: int, window: tuple[slice, ...], classes: int) -> torch.Tensor:
            m = mask if mask.dim() == len(window) + 1 else mask.unsqueeze(0)
            k = b % m.shape[0]
            part = m[(slice(k, k + 1), *window)].unsqueeze(1).to(torch.float32)
            return part.expand(1, classes, *part.shape[2:])

        return masked
    return None


class LinearScore:
    """A linear target read patch by patch: its weights over a patch, its gradient, its score summed.

    Parameters
    ----------
    weights : callable
        The target's ``M`` (:func:`linear_weights`).
    grid : WindowGrid
        The patches of the explained input's size.
    batch : int
        Examples in the explained batch.
    classes : int
        Scores per example (the output's channels).
    """

    def __init__(self, weights: Weights, grid: WindowGrid, batch: int, classes: int) -> None:
        self.m, self.grid, self.classes = weights, grid, classes
        self._scores = torch.zeros((batch, classes), dtype=torch.float64)

    def weights(self, b: int, p: int) -> torch.Tensor:
        """``(1, K, *patch)``: the target's weights over patch ``p``'s window (0 in the padding)."""
        grid = self.grid
        window = grid.slices[p]
        if not any(grid.pad):
            return self.m(b, window, self.classes)
        inner = [(max(s.start, o), min(s.stop, o + n)) for s, o, n in zip(window, grid.offset, grid.spatial)]
        out = torch.zeros((1, self.classes, *grid.roi), device=grid.weight.device)
        if all(lo < hi for lo, hi in inner):
            dst = tuple(slice(lo - s.start, hi - s.start) for (lo, hi), s in zip(inner, window))
            src = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(inner, grid.offset))
            out[(slice(None), slice(None), *dst)] = self.m(b, src, self.classes)
        return out

    def upstream(self, k: int) -> Upstream:
        """The gradient of the class-``k`` score summed over examples, per patch: class ``k``'s weights in
        channel ``k``, 0 elsewhere (the values autograd gives through the target: 1.0 times the weight)."""

        def at(b: int, p: int) -> torch.Tensor:
            w = self.weights(b, p)
            up = torch.zeros_like(w)
            up[:, k] = w[:, k]
            return up

        return at

    def add_patch(self, b: int, p: int, y: torch.Tensor) -> None:
        """Add patch ``p``'s output ``y`` ``(K, *patch)`` of example ``b``: its blended share times the weights."""
        share = y * self.grid.weight[0] / self.grid.count_at(p)[0]
        self._scores[b] += (share * self.weights(b, p)[0]).flatten(1).sum(-1).double().cpu()

    def scores(self) -> torch.Tensor:
        """``(N, K)`` float32: the target's scores of the stitched output, summed patch by patch."""
        return self._scores.float()
