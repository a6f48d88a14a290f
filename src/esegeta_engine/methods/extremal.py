"""Extremal perturbation (Fong, Patrick & Vedaldi 2019), 2D and 3D.

For each area fraction ``a`` a smooth mask ``m`` in [0, 1] is optimised so
that the perturbed input keeps the target score as high as possible
(``mode: preserve``: ``x m + b (1 - m)``) or pushes it as low as possible
(``mode: delete``: ``x (1 - m) + b m``), with ``b`` the baseline (a blurred
copy of the input by default, as in the paper). The paper's area constraint
``|| sort(m) - r_a ||^2``, with ``r_a`` the sorted reference of ``(1 - a)``
zeros and ``a`` ones, is added to the loss with a weight that grows
geometrically over the steps, so the final mask has the requested area. The
mask is parameterised on cells of ``cell_size`` voxels, interpolated to the input
grid and optionally Gaussian-smoothed (``smoothing`` voxels). The score is
divided by the unperturbed score's magnitude, so region sums and logits need
the same weights.

All areas and inputs are optimised together: one model evaluation (forward
and backward) per step. The map is the mask, summed over the areas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from esegeta_engine.errors import MethodError
from esegeta_engine.methods._batches import per_axis
from esegeta_engine.methods._common import BASELINES, gaussian_blur, make_baseline
from esegeta_engine.methods.registry import Call, CostInfo, MethodContext, MethodSpec, Param, register


def check_areas(value: float | tuple[float, ...], voxels: int) -> list[float]:
    """The area fractions of ``value``; each must lie in (0, 1) and cover 1..voxels-1 voxels.

    Raises
    ------
    MethodError
        On a fraction of 0 or 1, or one that selects no voxel (or all of them).
    """
    fix = "give area fractions strictly between 0 and 1, e.g. areas: [0.05, 0.1, 0.2]"
    areas = list(value) if isinstance(value, tuple) else [value]
    for a in areas:
        if not 0.0 < a < 1.0:
            raise MethodError(f"extremal_perturbation area {a:g} is outside (0, 1)", fix)
        if not 1 <= round(a * voxels) <= voxels - 1:
            raise MethodError(f"extremal_perturbation area {a:g} of a {voxels}-voxel input selects "
                              f"{round(a * voxels)} voxels", fix + " that selects at least one voxel")
    return areas


def area_reference(areas: list[float], n: int, voxels: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """Sorted reference masks ``(len(areas) * n, voxels)``: zeros, then ``round(a * voxels)`` ones."""
    rows = []
    for a in areas:
        ones = round(a * voxels)
        row = torch.cat([torch.zeros(voxels - ones), torch.ones(ones)])
        rows.extend([row] * n)
    return torch.stack(rows).to(device, dtype)


class ExtremalPerturbation:
    """Optimised masks of given areas (Captum's ``attribute`` shape)."""

    def __init__(self, ctx: MethodContext, params: Mapping[str, Any]) -> None:
        self.ctx, self.p = ctx, params
        self.masks: torch.Tensor | None = None  # (areas, N, 1, *spatial) after attribute

    def attribute(self, inputs: torch.Tensor, target: int = 0) -> torch.Tensor:
        """Return the sum over areas of the optimised masks ``(N, 1, *spatial)``."""
        ctx, p = self.ctx, self.p
        x = inputs.detach()
        n, size = x.shape[0], tuple(x.shape[2:])
        voxels = int(torch.tensor(size).prod())
        areas = check_areas(p["areas"], voxels)
        cells = per_axis(p["cell_size"], ctx, "cell_size")
        grid = tuple(-(-s // c) for s, c in zip(size, cells))
        mode = "bilinear" if len(size) == 2 else "trilinear"
        base = make_baseline(x, p["baseline"])
        reference = area_reference(areas, n, voxels, x.dtype, x.device)
        with torch.no_grad():
            scale = ctx.score_model(x)[:, target].abs().clamp(min=1e-12).repeat(len(areas))
        sign = -1.0 if p["mode"] == "preserve" else 1.0
        param = torch.full((len(areas) * n, 1, *grid), 0.5, dtype=x.dtype, device=x.device,
                           requires_grad=True)
        optimiser = torch.optim.Adam([param], lr=p["learning_rate"])
        xs = x.repeat(len(areas), *([1] * (x.dim() - 1)))
        bs = base.repeat(len(areas), *([1] * (x.dim() - 1)))
        growth = p["area_weight_growth"] ** (1.0 / max(1, p["steps"] - 1))
        weight = p["area_weight"]
        for _ in range(p["steps"]):
            with torch.enable_grad():
                m = self._mask(param, size, mode)
                kept = m if p["mode"] == "preserve" else 1 - m
                score = ctx.score_model(xs * kept + bs * (1 - kept))[:, target]
                area = ((m.flatten(1).sort(dim=1).values - reference) ** 2).mean(dim=1)
                loss = (sign * score / scale + weight * area).sum()
                (grad,) = torch.autograd.grad(loss, param)
            optimiser.zero_grad(set_to_none=True)
            param.grad = grad
            optimiser.step()
            with torch.no_grad():
                param.clamp_(0.0, 1.0)
            weight *= growth
        with torch.no_grad():
            masks = self._mask(param, size, mode).detach().reshape(len(areas), n, 1, *size)
        self.masks = masks
        return masks.sum(dim=0)

    def _mask(self, param: torch.Tensor, size: tuple[int, ...], mode: str) -> torch.Tensor:
        m = param if tuple(param.shape[2:]) == size else F.interpolate(param, size=size, mode=mode,
                                                                       align_corners=False)
        if self.p["smoothing"] > 0:
            m = gaussian_blur(m, self.p["smoothing"])
        return m


def _cost(info: CostInfo, params: Mapping[str, Any]) -> int:
    """The unperturbed score, then one evaluation per step (all areas and inputs in one batch)."""
    return 1 + int(params["steps"])


register(MethodSpec(
    name="extremal_perturbation", family="perturbation", title="Extremal Perturbation",
    summary="smooth masks of given area fractions optimised to keep (or delete) the score; the map is "
            "the mask, summed over the areas",
    params=(Param("areas", "floats", 0.1,
                  "area fraction of the mask in (0, 1), or a list of them (one mask each)",
                  minimum=0.0, maximum=1.0),
            Param("mode", "str", "preserve",
                  "preserve: keep the score with only the mask; delete: remove the score by the mask",
                  choices=("preserve", "delete")),
            Param("steps", "int", 200, "optimisation steps (one model evaluation each)",
                  minimum=1, maximum=100000),
            Param("cell_size", "ints", 4, "edge in voxels of a mask parameter cell (one or one per axis)",
                  minimum=1, maximum=4096),
            Param("smoothing", "float", 0.0, "Gaussian smoothing of the mask in voxels (0: none)",
                  minimum=0.0, maximum=1000.0),
            Param("learning_rate", "float", 0.05, "Adam learning rate of the mask parameters",
                  minimum=1e-6, maximum=10.0),
            Param("area_weight", "float", 1.0, "initial weight of the area constraint",
                  minimum=0.0, maximum=1e9),
            Param("area_weight_growth", "float", 100.0,
                  "factor by which the area weight grows from the first to the last step",
                  minimum=1.0, maximum=1e9),
            Param("baseline", "str", "blur",
                  "what replaces the input outside the mask: a blurred copy (paper), zero, the "
                  "input's min or mean", choices=BASELINES)),
    build=lambda ctx, p: Call(ExtremalPerturbation(ctx, p)),
    reference="Fong, Patrick & Vedaldi 2019, Understanding Deep Networks via Extremal Perturbations "
              "and Smooth Masks, ICCV, arXiv:1910.08485",
    patchwise="gradient", cost=_cost))
