"""RISE: randomised input sampling (Petsiuk, Das & Saenko 2018), 2D and 3D.

Each mask is a random binary grid of cells (each cell kept with probability
``keep_probability``), linearly interpolated to ``cell_size`` voxels per cell
on a grid one cell larger than the input, and cropped at a random shift of
less than one cell. The map is the score-weighted mean of the masks,

    S(v) = 1 / (n_masks * p) * sum_i f(x * M_i + b * (1 - M_i)) * M_i(v),

with ``b`` the baseline (zero in the paper). Masks are drawn from a
``torch.Generator`` seeded with the run's seed, ``batch_size`` at a time, and
never all held in memory: memory does not grow with ``n_masks``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from esegeta_engine.methods._batches import (
    BATCH_SIZE,
    TimeBudget,
    n_batches,
    per_axis,
    stack_input_major,
    unstack_scores,
)
from esegeta_engine.methods._common import BASELINE_PARAM, make_baseline
from esegeta_engine.methods.registry import Call, CostInfo, MethodContext, MethodSpec, Param, register


def rise_masks(generator: torch.Generator, count: int, size: tuple[int, ...], cells: tuple[int, ...],
               keep: float) -> torch.Tensor:
    """``count`` RISE masks ``(count, 1, *size)`` in [0, 1] on the CPU.

    Parameters
    ----------
    generator : torch.Generator
        CPU generator all randomness is drawn from.
    count : int
        Number of masks.
    size : tuple of int
        Spatial size of the input.
    cells : tuple of int
        Cell edge in voxels per axis.
    keep : float
        Probability that a cell is kept (1).
    """
    grid = tuple(math.ceil(s / c) + 1 for s, c in zip(size, cells))
    binary = (torch.rand(count, 1, *grid, generator=generator) < keep).float()
    upsampled = tuple(g * c for g, c in zip(grid, cells))
    mode = "bilinear" if len(size) == 2 else "trilinear"
    smooth = F.interpolate(binary, size=upsampled, mode=mode, align_corners=False)
    shifts = torch.stack([torch.randint(0, c, (count,), generator=generator) for c in cells], dim=1)
    out = torch.empty(count, 1, *size)
    for i in range(count):
        box = tuple(slice(int(s), int(s) + n) for s, n in zip(shifts[i], size))
        out[i, 0] = smooth[(i, 0, *box)]
    return out


class Rise:
    """RISE with masks generated batch by batch (Captum's ``attribute`` shape)."""

    def __init__(self, ctx: MethodContext, params: Mapping[str, Any]) -> None:
        self.ctx, self.p = ctx, params

    def attribute(self, inputs: torch.Tensor, target: int = 0) -> torch.Tensor:
        """Return the input-grid map ``(N, 1, *spatial)`` of class ``target``."""
        ctx, p = self.ctx, self.p
        x = inputs.detach()
        n, size = x.shape[0], tuple(x.shape[2:])
        cells = per_axis(p["cell_size"], ctx, "cell_size")
        base = make_baseline(x, p["baseline"])
        generator = torch.Generator().manual_seed(int(ctx.seed))
        total, bs, keep = p["n_masks"], p["batch_size"], p["keep_probability"]
        budget = TimeBudget(getattr(ctx.score_model, "monitor", None), "rise", total, bs, "n_masks",
                            "masks")
        saliency = torch.zeros(n, 1, *size, dtype=torch.float64, device=x.device)
        with torch.no_grad():
            for batch, start in enumerate(range(0, total, bs)):
                b = min(bs, total - start)
                masks = rise_masks(generator, b, size, cells, keep).to(x.device, x.dtype)  # (b, 1, *s)
                copies = x.unsqueeze(0) * masks.unsqueeze(1) + base.unsqueeze(0) * (1 - masks.unsqueeze(1))
                scores = unstack_scores(ctx.score_model(stack_input_major(copies))[:, target], n)  # (N, b)
                weighted = scores.to(masks.dtype) @ masks.reshape(b, -1)  # (N, voxels) for this batch
                saliency += weighted.double().reshape(n, 1, *size)  # accumulated in float64
                if batch == 0:
                    budget.after_first_batch()
        return (saliency / (total * keep)).to(x.dtype)


def _cost(info: CostInfo, params: Mapping[str, Any]) -> int:
    """One evaluation per batch of masks."""
    return n_batches(int(params["n_masks"]), int(params["batch_size"]))


register(MethodSpec(
    name="rise", family="perturbation", title="RISE",
    summary="score-weighted mean of random smooth masks (low-resolution binary grids, interpolated and "
            "randomly shifted); masks drawn batch by batch",
    params=(Param("n_masks", "int", 1000, "random masks evaluated (more: smoother, closer to the "
                  "expectation)", minimum=1, maximum=10_000_000),
            Param("cell_size", "ints", 8, "edge of a mask cell in voxels (one or one per spatial axis)",
                  minimum=1, maximum=4096),
            Param("keep_probability", "float", 0.5, "probability that a cell is kept",
                  minimum=0.01, maximum=1.0),
            BASELINE_PARAM, BATCH_SIZE),
    build=lambda ctx, p: Call(Rise(ctx, p)),
    reference="Petsiuk, Das & Saenko 2018, RISE: Randomized Input Sampling for Explanation of "
              "Black-box Models, BMVC, arXiv:1806.07421",
    patchwise="perturbation", cost=_cost))
