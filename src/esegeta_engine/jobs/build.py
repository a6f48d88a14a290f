"""Targets on the model's grid, their support, and readable out-of-memory errors."""

from __future__ import annotations

import numpy as np
import torch

from esegeta_engine import targets as T
from esegeta_engine.channel_target import LayerChannelTarget
from esegeta_engine.config import TargetConfig
from esegeta_engine.errors import MethodError, TargetError
from esegeta_engine.forward.runner import ExecutionForm
from esegeta_engine.preprocess import AxisOrder, Geometry


def build_target(cfg: TargetConfig, spatial_dims: int, roi_mask: np.ndarray | None = None,
                 axis_order: str = "xyz", geometry: Geometry | None = None,
                 volume_shape: tuple[int, ...] | None = None) -> T.Target:
    """Build the target of ``cfg``; ``roi_mask`` and ``cfg.voxel`` are in NIfTI order.

    ``geometry`` (default: the axis order alone) maps them onto the model's grid;
    ``volume_shape`` (NIfTI spatial shape) is needed for a voxel under reorientation.
    """
    act = cfg.resolved_activation
    geometry = geometry or Geometry(axis_order)
    if cfg.kind == "argmax":
        return T.ArgmaxRegionTarget(act, frozen=cfg.frozen)
    if cfg.kind == "otsu":
        return T.OtsuThresholdTarget(act, channel=cfg.channel, frozen=cfg.frozen)
    if cfg.kind == "classification":
        return T.ClassificationTarget(act)
    if cfg.kind == "roi":
        if roi_mask is None:
            raise TargetError("target kind 'roi' needs a mask", "give target.roi_mask")
        return T.RegionOfInterestTarget(geometry.to_model(np.asarray(roi_mask)), act)
    if cfg.kind == "outcome":
        from esegeta_engine.regions import OutcomeTarget

        if roi_mask is None:
            raise TargetError("target kind 'outcome' needs a ground truth", "give target.ground_truth")
        return OutcomeTarget(geometry.to_model(np.asarray(roi_mask)), cfg.outcome, act)
    if cfg.kind == "voxel":
        if len(cfg.voxel or ()) != spatial_dims:
            raise TargetError(f"target.voxel {cfg.voxel} needs {spatial_dims} indices", "give x, y[, z]")
        shape = volume_shape or tuple(1 << 30 for _ in range(spatial_dims))
        return T.VoxelTarget(geometry.index_to_model(cfg.voxel, shape), act)
    if cfg.kind == "channel" and cfg.layer:
        unit = None
        if cfg.unit:
            if len(cfg.unit) != spatial_dims:
                raise TargetError(f"target.unit {cfg.unit} needs {spatial_dims} indices", "give x, y[, z]")
            unit = [cfg.unit[i] for i in AxisOrder(geometry.axis_order).permutation]
        return LayerChannelTarget(cfg.layer, cfg.channel, unit, act)
    raise TargetError(f"unknown target kind {cfg.kind!r}",
                      "use argmax, otsu, roi, voxel, classification, channel or outcome")


def target_support(target: T.Target, spatial: tuple[int, ...], cls: int | None = None) -> torch.Tensor | None:
    """Output voxels (model grid, bool) that ``target``'s scores (of class ``cls``) read; None when all."""
    if callable(getattr(target, "support", None)):  # outcome regions, components
        return target.support(cls)
    if isinstance(target, T.RegionOfInterestTarget):
        m = target.mask
        return (m.any(0) if m.dim() == len(spatial) + 1 else m).bool()
    if isinstance(target, T.VoxelTarget):
        support = torch.zeros(spatial, dtype=torch.bool)
        if all(0 <= i < s for i, s in zip(target.index, spatial)):
            support[tuple(target.index)] = True
            return support
    return None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower()
                                           or "not enough memory" in str(exc).lower()))


def memory_error(shape: tuple[int, ...], form: ExecutionForm | None = None) -> MethodError:
    """The readable error for an out-of-memory model evaluation, with what would fit."""
    if form is not None and form.sliding is not None:
        smaller = [max(16, p // 2) for p in form.sliding.patch_size]
        fix = (f"use a smaller execution.patch_size (e.g. {smaller}), execution.sw_batch_size: 1, "
               "or execution.precision: bf16 (fp16 on a GPU)")
    else:
        side = 96 if len(shape) == 5 else 256
        fix = (f"run patch by patch: execution.patch_size: {[side] * (len(shape) - 2)} (the network's training "
               "patch size), and/or execution.precision: bf16 (fp16 on a GPU); for IG lower internal_batch_size")
    return MethodError(f"ran out of memory evaluating the model on an input of shape {tuple(shape)}", fix)


def padding_search_input(x: torch.Tensor, largest: int = 32, least: int = 64) -> torch.Tensor:
    """A small stand-in for ``x[:1]`` while the padding a network needs is searched (``divisible_by: auto``).

    Each axis keeps its size modulo ``largest`` (the largest padding multiple tried, 2**5), so padding the
    crop to any 2**k ≤ ``largest`` leaves the same remainders, and fails or works as the whole input would;
    axes longer than ``least + largest`` are cut to ``least`` plus that remainder. A whole-brain search ran
    the whole volume up to five times (issue 19); this runs a crop of at most 95 voxels an axis.
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    size = tuple(s if s < least + largest else least + s % largest for s in spatial)
    starts = tuple((s - c) // 2 for s, c in zip(spatial, size))
    return x[(slice(0, 1), slice(None), *(slice(a, a + c) for a, c in zip(starts, size)))]
