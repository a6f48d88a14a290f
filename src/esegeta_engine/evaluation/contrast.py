"""Class-contrast check: does the map change when another class is explained?

An explanation of *why class k* should differ from one of *why class j*; a map that stays the
same for every class shows the input's or the network's structure rather than evidence for
the class (Sixt, Granz & Landgraf 2020, *When Explanations Lie*, ICML, arXiv:1912.09818;
Quantus's RandomLogit metric compares the explanation of the target with that of a random
other class). The method is run once more for a contrast class — given, or drawn from the
other classes with a seeded generator as RandomLogit does — and the two maps are compared by
rank correlation of ``|map|`` and SSIM. A map whose rank correlation with the contrast map
is at or above the threshold is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from esegeta_engine.evaluation.similarity import spearman, ssim
from esegeta_engine.methods.registry import MethodContext, MethodSpec
from esegeta_engine.methods.run import attribute

__all__ = ["class_contrast", "contrast_class"]


def contrast_class(n_classes: int, target: int, seed: int) -> int | None:
    """A class other than ``target``, drawn with a generator seeded by ``seed`` (``None``: only one)."""
    others = [k for k in range(n_classes) if k != target]
    if not others:
        return None
    return others[int(np.random.default_rng(int(seed)).integers(len(others)))]


def class_contrast(spec: MethodSpec, ctx: MethodContext, params: Mapping[str, Any], attribution: torch.Tensor,
                   *, other: int | None = None, threshold: float = 0.9,
                   noise_tunnel: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compare the map of ``ctx.target`` with the same method's map of another class.

    Parameters
    ----------
    spec, params, noise_tunnel
        The method as it made the map.
    ctx : MethodContext
        Its context (one input).
    attribution : torch.Tensor
        The map ``(1, C, *spatial)``.
    other : int, optional
        The contrast class; default a seeded random other class (``ctx.seed``).
    threshold : float
        Flag the map when ``|Spearman|`` of the two maps is at or above it.

    Returns
    -------
    dict
        ``class_contrast_class``, ``class_contrast_spearman``, ``class_contrast_ssim`` and
        ``class_contrast_status`` (``ok``, ``flagged`` or ``undefined``) with a
        ``class_contrast_note``.
    """
    if other is None:
        with torch.no_grad():
            n = int(ctx.score_model(ctx.inputs).shape[1])
        other = contrast_class(n, ctx.target, ctx.seed)
    if other is None or other == ctx.target:
        return {"class_contrast_status": "undefined", "class_contrast_note": "the model scores a single class"}
    contrast = attribute(spec, replace(ctx, target=int(other), extra={}), params, noise_tunnel)
    a = attribution.detach().sum(1)[0].cpu().numpy()
    b = contrast.detach().sum(1)[0].cpu().numpy()
    rho, structural = spearman(a, b), ssim(a, b)
    out: dict[str, Any] = {"class_contrast_class": int(other), "class_contrast_spearman": rho,
                           "class_contrast_ssim": structural}
    if not math.isfinite(rho):
        return {**out, "class_contrast_status": "undefined",
                "class_contrast_note": "a map is constant or not finite: no rank correlation"}
    if abs(rho) >= threshold:
        return {**out, "class_contrast_status": "flagged",
                "class_contrast_note": f"the map hardly changes with the class (|Spearman| {abs(rho):.2f} >= "
                                       f"{threshold:g} against class {other}): it may show the input or the "
                                       "architecture rather than evidence for this class"}
    return {**out, "class_contrast_status": "ok", "class_contrast_note": ""}
