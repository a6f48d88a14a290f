"""RISE: randomised input sampling (Petsiuk, Das & Saenko 2018), 2D and 3D.

For an ROI or voxel target a mask that equals 1 on every voxel the target's receptive field
covers leaves the score unchanged and costs no evaluation (:mod:`.reach`). This is exact but rare:
a mask is a random field over the whole image, so it must keep every cell that reaches the
target, which happens with probability ``keep_probability ** cells``.

Each mask is a random binary grid of cells (each cell kept with probability
``keep_probability``), linearly interpolated to ``cell_size`` voxels per cell
on a grid one cell larger than the input, and cropped at a random shift of
less than one cell. The map is the score-weighted mean of the masks,

    S(v) = 1 / (n_masks * p) * sum_i f(x * M_i + b * (1 - M_i)) * M_i(v),

with ``b`` the baseline (zero in the paper). Mask ``i`` is drawn from its own
``torch.Generator`` seeded from the run's seed and ``i`` (:func:`mask_seed`), and the
map is accumulated mask by mask in that order in float64: ``batch_size`` (a memory
setting) never changes which masks are drawn, nor the map. Masks are made
``batch_size`` at a time and never all held in memory: memory does not grow with
``n_masks``.
"""

from __future__ import annotations

import hashlib
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
from esegeta_engine.methods.reach import Reached, reach_filter
from esegeta_engine.methods.registry import Call, CostInfo, MethodContext, MethodSpec, Param, register


def mask_seed(seed: int, index: int) -> int:
    """The generator seed of mask ``index`` of a run seeded with ``seed`` (independent streams)."""
    digest = hashlib.blake2b(f"rise:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def mask_cells(seed: int, index: int, size: tuple[int, ...], cells: tuple[int, ...], keep: float
               ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Mask ``index``'s binary cell grid ``(1, 1, *grid)`` and its shift (voxels per axis)."""
    generator = torch.Generator().manual_seed(mask_seed(seed, index))
    grid = tuple(math.ceil(s / c) + 1 for s, c in zip(size, cells))
    binary = (torch.rand(1, 1, *grid, generator=generator) < keep).float()
    shift = tuple(int(torch.randint(0, c, (1,), generator=generator)) for c in cells)
    return binary, shift


def rise_masks(seed: int, indices: range, size: tuple[int, ...], cells: tuple[int, ...],
               keep: float) -> torch.Tensor:
    """RISE masks ``indices`` as ``(len(indices), 1, *size)`` in [0, 1] on the CPU.

    Parameters
    ----------
    seed : int
        The run's seed; mask ``i`` depends only on it and ``i``.
    indices : range
        Which masks.
    size : tuple of int
        Spatial size of the input.
    cells : tuple of int
        Cell edge in voxels per axis.
    keep : float
        Probability that a cell is kept (1).
    """
    mode = "bilinear" if len(size) == 2 else "trilinear"
    out = torch.empty(len(indices), 1, *size)
    for k, i in enumerate(indices):
        binary, shift = mask_cells(seed, i, size, cells, keep)
        upsampled = tuple(g * c for g, c in zip(binary.shape[2:], cells))
        smooth = F.interpolate(binary, size=upsampled, mode=mode, align_corners=False)
        out[k, 0] = smooth[(0, 0, *(slice(s, s + n) for s, n in zip(shift, size)))]
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
        total, bs, keep = p["n_masks"], p["batch_size"], p["keep_probability"]
        budget = TimeBudget(getattr(ctx.score_model, "monitor", None), "rise", total, bs, "n_masks",
                            "masks")
        saliency = torch.zeros(n, 1, *size, dtype=torch.float64, device=x.device)
        reach = reach_filter(ctx.score_model, x)  # masks equal to 1 wherever the target can see cost nothing
        forward = reach if reach is not None else ctx.score_model
        with torch.no_grad():
            for batch, start in enumerate(range(0, total, bs)):
                b = min(bs, total - start)
                masks = rise_masks(ctx.seed, range(start, start + b), size, cells, keep).to(x.device, x.dtype)
                copies = x.unsqueeze(0) * masks.unsqueeze(1) + base.unsqueeze(0) * (1 - masks.unsqueeze(1))
                scores = unstack_scores(forward(stack_input_major(copies))[:, target], n)  # (N, b)
                for i in range(b):  # mask by mask in index order: the sum does not depend on batch_size
                    saliency += scores[:, i].double().reshape(n, *([1] * (x.dim() - 1))) * masks[i].double()
                if batch == 0:
                    budget.after_first_batch()
        if reach is not None:
            Reached(None, reach, ctx, "rise", "masks").report()
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
