"""Cost functions of the Captum-backed methods: model evaluations known before a method runs.

Each method names its cost function where it is registered (``cost=`` of its
:class:`~esegeta_engine.methods.registry.MethodSpec`); this module only holds the functions
shared by several methods. The numbers follow Captum's batching (checked against the counted
evaluations in the method tests): progress totals, ETAs and the planner's cost estimates
come from here. Supervoxel methods on SLIC masks use ``n_segments`` as the
number of features before the mask exists; the executor refines it once the mask
is built (``n_features``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from esegeta_engine.methods.behaviour import CostInfo

PATCHWISE_IG_BATCH = 1
"""Integrated Gradients' internal batch under sliding-window execution: path points are
explained one at a time (patches are batched instead), so memory holds one input copy."""


def _n_features(info: CostInfo, p: Mapping[str, Any]) -> int:
    if info.n_features is not None:
        return info.n_features
    if p.get("mask") == "grid":
        size = p.get("grid_size", 8)
        sizes = size if isinstance(size, tuple) else (size,) * len(info.spatial)
        return math.prod(math.ceil(s / b) for s, b in zip(info.spatial, sizes))
    return int(p.get("n_segments", 64))


def one(info: CostInfo, p: Mapping[str, Any]) -> int:
    return 1


def ig_like(info: CostInfo, p: Mapping[str, Any]) -> int:
    if info.layer_per_member:  # a layer-space path through a deployed pipeline: one pass per point
        return int(p["n_steps"]) * info.batch * info.noise_tunnel_samples
    ibs = int(p.get("internal_batch_size") or 1)
    if info.patchwise:
        ibs = PATCHWISE_IG_BATCH
    examples = info.batch * info.noise_tunnel_samples
    return math.ceil(int(p["n_steps"]) / max(1, ibs // examples))


def occlusion(info: CostInfo, p: Mapping[str, Any]) -> int:
    dims = len(info.spatial)
    window = p["window"] if isinstance(p["window"], tuple) else (p["window"],) * dims
    stride = window if p.get("stride") is None else (
        p["stride"] if isinstance(p["stride"], tuple) else (p["stride"],) * dims)
    shifts = math.prod(math.ceil((s - w) / st) + 1 for s, w, st in zip(info.spatial, window, stride))
    return 1 + math.ceil(shifts / int(p["perturbations_per_eval"]))


def ablation(info: CostInfo, p: Mapping[str, Any]) -> int:
    return 1 + math.ceil(_n_features(info, p) / int(p["perturbations_per_eval"]))


def shapley(info: CostInfo, p: Mapping[str, Any]) -> int:
    return 1 + int(p["n_samples"]) * math.ceil(_n_features(info, p) / int(p["perturbations_per_eval"]))


def sampled(info: CostInfo, p: Mapping[str, Any]) -> int:
    return info.batch * math.ceil(int(p["n_samples"]) / int(p["perturbations_per_eval"]))
