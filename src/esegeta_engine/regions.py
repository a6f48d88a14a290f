"""Outcome targets and one target per structure (connected component).

A review of a segmentation model is a review of its errors. :class:`OutcomeTarget` ties the
explained score to the ground truth's agreement with the (frozen, unperturbed) prediction:

- ``tp``: the class score summed where prediction and ground truth both have the class;
- ``fp``: where the model predicts the class and the ground truth does not;
- ``fn``: where the ground truth has the class and the prediction does not — the class
  score (logit, or probability with an activation) there, so a gradient says what would
  raise it ("what would have made the model predict the class here").

:func:`expand_components` splits a region target (argmax, Otsu, outcome) into one score
per connected component (26-connectivity in 3D, 8 in 2D), largest first, as one
:class:`ComponentsTarget` whose columns are the components: every component is its own
job, and the components' scores sum to the class score when none is dropped.

Examples
--------
>>> import torch
>>> from esegeta_engine.regions import OutcomeTarget
>>> out = torch.zeros(1, 2, 4, 4); out[:, 1, :2] = 1.0          # predicts class 1 on rows 0-1
>>> gt = torch.zeros(4, 4, dtype=torch.long); gt[1:3] = 1        # truth: rows 1-2
>>> t = OutcomeTarget(gt, "fn"); t.prepare(out)
>>> t.region(1)[0].sum().item()                                   # row 2 is missed
4
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from esegeta_engine.errors import TargetError
from esegeta_engine.targets import ArgmaxRegionTarget, OtsuThresholdTarget, Target, _tile, channel_argmax

OUTCOMES = ("tp", "fp", "fn")

__all__ = ["OUTCOMES", "Component", "ComponentsTarget", "OutcomeTarget", "connected_components",
           "expand_components", "predicted_labels", "region_of", "voxel_scores"]


def predicted_labels(output: torch.Tensor) -> torch.Tensor:
    """The prediction ``(N, *spatial)``: argmax over classes, or logit > 0 for one channel.

    The same rule as the written prediction file (:meth:`Explainer.predict`).
    """
    if output.shape[1] > 1:
        return channel_argmax(output.detach())
    return (output.detach()[:, 0] > 0).long()


class OutcomeTarget(Target):
    """Class scores summed over true-positive, false-positive or false-negative voxels.

    Parameters
    ----------
    ground_truth : array-like
        Label image on the model's output grid (``(*spatial)`` or ``(N, *spatial)``);
        for a one-channel (binary) model any non-zero label is the structure.
    outcome : {"tp", "fp", "fn"}
        Which agreement region the scores sum over.
    activation : {"none", "softmax", "sigmoid"}
        Applied over the class axis first (``none``: the logit).
    """

    kind = "outcome"

    def __init__(self, ground_truth: torch.Tensor | np.ndarray, outcome: str = "fn",
                 activation: str = "none") -> None:
        super().__init__(activation)
        if outcome not in OUTCOMES:
            raise TargetError(f"unknown outcome {outcome!r}", f"use one of {', '.join(OUTCOMES)}")
        self.outcome = outcome
        gt = torch.as_tensor(np.ascontiguousarray(ground_truth)).long()
        self.register_buffer("ground_truth", gt, persistent=False)
        self.register_buffer("regions", torch.empty(0, dtype=torch.bool), persistent=False)

    def _truth(self, output: torch.Tensor) -> torch.Tensor:
        self._check_spatial(output, "outcome")
        spatial = tuple(output.shape[2:])
        gt = self.ground_truth if self.ground_truth.dim() == len(spatial) + 1 else self.ground_truth.unsqueeze(0)
        if tuple(gt.shape[1:]) != spatial:
            raise TargetError(f"the ground truth has shape {tuple(gt.shape[1:])} but the model output grid is "
                              f"{spatial}", "give the ground truth on the input volume's grid")
        return _tile(gt.to(output.device), output.shape[0])

    def prepare(self, output: torch.Tensor) -> None:
        gt = self._truth(output)
        pred = predicted_labels(output)
        k = output.shape[1]
        classes = range(k)
        if k == 1:
            p, g = (pred != 0)[:, None], (gt != 0)[:, None]
        else:
            p = torch.stack([pred == c for c in classes], 1)
            g = torch.stack([gt == c for c in classes], 1)
        self.regions = {"tp": p & g, "fp": p & ~g, "fn": g & ~p}[self.outcome]

    def voxel_scores(self, output: torch.Tensor) -> torch.Tensor:
        """Per-voxel contributions ``(N, K, *spatial)``; their spatial sum is :meth:`forward`."""
        if not self.regions.numel():
            self.prepare(output.detach())
        return self.activation(output) * _tile(self.regions, output.shape[0]).to(output.dtype)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return self.voxel_scores(output).flatten(2).sum(-1)

    def region(self, cls: int) -> torch.Tensor:
        """Frozen outcome region of class ``cls`` ``(N, *spatial)``, bool."""
        return self.regions[:, cls]

    def support(self, cls: int | None = None) -> torch.Tensor | None:
        """Voxels the scores read (one volume, model grid): class ``cls``'s region, or all classes'."""
        if not self.regions.numel():
            return None
        r = self.regions[:1, cls] if cls is not None else self.regions[:1].any(1)
        return r[0]

    def default_classes(self, output: torch.Tensor) -> list[int]:
        if not self.regions.numel():
            self.prepare(output.detach())
        present = [c for c in range(self.regions.shape[1]) if bool(self.regions[:, c].any())]
        return [c for c in present if c != 0 or self.regions.shape[1] == 1]

    def class_label(self, index: int) -> str:
        return f"{self.outcome}-class{index}"


def region_of(target: Target, cls: int) -> torch.Tensor:
    """The frozen region ``(N, *spatial)`` whose class-``cls`` scores ``target`` sums."""
    if isinstance(target, OutcomeTarget):
        return target.region(cls)
    if isinstance(target, ArgmaxRegionTarget) and target.region.numel():
        if not 0 <= cls < target.classes:  # the labels are uint8: an out-of-range class would wrap onto another
            raise TargetError(f"target.classes [{cls}] do not exist: the model has {target.classes} output channels",
                              f"use classes in 0..{target.classes - 1}")
        return target.region == cls
    if isinstance(target, OtsuThresholdTarget) and target.foreground.numel():
        return target.foreground if cls == 1 else ~target.foreground
    raise TargetError(f"target kind {target.kind!r} has no frozen region to split into components",
                      "use target.components with kind argmax, otsu or outcome (frozen: true)")


def voxel_scores(target: Target, output: torch.Tensor) -> torch.Tensor:
    """Per-voxel contributions ``(N, K, *spatial)`` of a region target (spatial sum = its scores)."""
    if isinstance(target, OutcomeTarget):
        return target.voxel_scores(output)
    if isinstance(target, ArgmaxRegionTarget):
        target._check(output)
        return target.activation(output) * _tile(target.onehot, output.shape[0]).to(output.dtype)
    if isinstance(target, OtsuThresholdTarget):
        prob = target._probability(output)
        fg = _tile(target.foreground, prob.shape[0]).to(prob.dtype)
        return torch.stack([(1 - prob) * (1 - fg), prob * fg], dim=1)
    raise TargetError(f"target kind {target.kind!r} cannot be split into components",
                      "use target.components with kind argmax, otsu or outcome")


def connected_components(mask: np.ndarray, min_voxels: int = 1,
                         max_components: int | None = None) -> list[np.ndarray]:
    """Connected components of a boolean 2D/3D mask, largest first (ties: first voxel order).

    Full connectivity (8 in 2D, 26 in 3D); components under ``min_voxels`` are dropped and at
    most ``max_components`` are kept.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = sorted(range(n), key=lambda i: (-int(sizes[i]), i))
    kept = [i + 1 for i in order if sizes[i] >= max(1, min_voxels)]
    if max_components is not None:
        kept = kept[:max_components]
    return [labels == i for i in kept]


@dataclass
class Component:
    """One structure: its class, rank (1 = largest), mask on the model grid and where it is."""

    cls: int
    index: int
    mask: torch.Tensor
    voxels: int
    centroid_voxel: list[float]
    centroid_mm: list[float]

    def describe(self) -> dict[str, Any]:
        """JSON-able record of the component (NIfTI voxel centroid and world mm)."""
        return {"class": self.cls, "component": self.index, "voxels": self.voxels,
                "centroid_voxel": [round(v, 2) for v in self.centroid_voxel],
                "centroid_mm": [round(v, 2) for v in self.centroid_mm]}


class ComponentsTarget(Target):
    """One score per connected component of a region target's classes.

    Column ``j`` is the parent's class-``cls_j`` per-voxel score summed over component
    ``j`` only, so for each class the columns sum to the parent's class score when every
    component is kept.
    """

    def __init__(self, parent: Target, components: Sequence[Component]) -> None:
        super().__init__("none")
        if not components:
            raise TargetError("no component is left to explain", "lower target.min_voxels")
        self.parent = parent
        self.kind = parent.kind
        self.components = list(components)
        spatial = tuple(self.components[0].mask.shape)
        self.cls_of = [c.cls for c in self.components]
        lab = {}
        for j, c in enumerate(self.components):
            m = lab.setdefault(c.cls, torch.full(spatial, len(self.components), dtype=torch.long))
            m[c.mask] = j
        self._labels = {cls: m.flatten() for cls, m in lab.items()}

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        vs = voxel_scores(self.parent, output)
        n, m = output.shape[0], len(self.components)
        out = torch.zeros(n, m + 1, dtype=vs.dtype, device=vs.device)
        for cls, lab in self._labels.items():
            idx = lab.to(vs.device).expand(n, -1)
            out = out.scatter_add(1, idx, vs[:, cls].flatten(1))
        return out[:, :m]

    def n_scores(self, output: torch.Tensor) -> int:
        return len(self.components)

    def default_classes(self, output: torch.Tensor) -> list[int]:
        return list(range(len(self.components)))

    def class_label(self, index: int) -> str:
        c = self.components[index]
        return f"{self.parent.class_label(c.cls)}__component-{c.index:02d}"

    def describe(self, index: int) -> dict[str, Any]:
        """The record of column ``index``'s component."""
        return self.components[index].describe()

    def support(self, cls: int | None = None) -> torch.Tensor:
        """Voxels column ``cls`` reads (all components' when ``None``)."""
        if cls is not None:
            return self.components[cls].mask
        return torch.stack([c.mask for c in self.components]).any(0)


def expand_components(target: Target, output: torch.Tensor, classes: Sequence[int] | None, *,
                      min_voxels: int = 1, max_components: int | None = None,
                      geometry: Any = None, affine: np.ndarray | None = None) -> Target:
    """Split a prepared region target into one column per connected component (largest first).

    Parameters
    ----------
    target : Target
        A prepared argmax, Otsu or outcome target (one volume).
    output : torch.Tensor
        The unperturbed model output the target was prepared on.
    classes : sequence of int, optional
        Classes to split (default: the target's default classes).
    min_voxels, max_components : int
        Specks below ``min_voxels`` are ignored; at most ``max_components`` per class.
    geometry : Geometry, optional
        Model grid -> NIfTI grid, for centroids in the scan's voxel indices.
    affine : np.ndarray, optional
        The scan's voxel-to-world matrix, for centroids in mm.
    """
    if output.shape[0] != 1:
        raise TargetError("components are split per volume", "explain one volume at a time")
    comps: list[Component] = []
    chosen = list(classes) if classes else target.default_classes(output)
    if not chosen:  # nothing in the region (an outcome the model does not make): no job
        return target
    for cls in chosen:
        region = region_of(target, int(cls))[0].cpu().numpy()
        for k, mask in enumerate(connected_components(region, min_voxels, max_components), start=1):
            nifti = geometry.to_nifti(mask) if geometry is not None else mask
            centroid = np.argwhere(nifti).mean(0)
            mm = (np.asarray(affine)[:3, :3] @ np.pad(centroid, (0, 3 - len(centroid)))
                  + np.asarray(affine)[:3, 3]) if affine is not None else centroid
            tensor = torch.from_numpy(np.ascontiguousarray(mask)).to(output.device)
            comps.append(Component(int(cls), k, tensor, int(mask.sum()), [float(v) for v in centroid],
                                   [float(v) for v in mm]))
    if not comps:
        raise TargetError(f"the {target.kind} region has no component of at least {min_voxels} voxel(s) in "
                          f"classes {list(classes or [])}", "lower target.min_voxels or check the classes")
    return ComponentsTarget(target, comps)


def load_ground_truth(path: Any, volumes: Sequence[Any], spatial_dims: int) -> np.ndarray:
    """Read a ground-truth label image (nibabel) and check it lies on every volume's grid.

    Returns integer labels in NIfTI order; they are reoriented with the volume when the target
    is built (``preprocess.orientation``).

    Raises
    ------
    VolumeError
        Naming the file, the volume and what differs (shape or affine), with the fix.
    """
    from esegeta_engine.errors import VolumeError
    from esegeta_engine.inputs import load_mask_file

    m = load_mask_file(path, spatial_dims, "ground truth")
    for v in volumes:
        name = v.path.name if v.path else "the volume"
        if m.data.shape != v.data.shape[:spatial_dims]:
            raise VolumeError(f"ground truth {m.path.name} has shape {m.data.shape} but {name} has "
                              f"{v.data.shape[:spatial_dims]}", "give the ground truth on the volume's grid "
                              "(resample it with nearest-neighbour interpolation)")
        if not np.allclose(m.affine, v.affine, atol=1e-3):
            raise VolumeError(f"ground truth {m.path.name} and {name} have different geometry (affines differ)",
                              "resample the ground truth onto the volume's grid (nearest neighbour)")
    labels = np.rint(m.data).astype(np.int64)
    if not np.allclose(labels, m.data, atol=1e-3) or labels.min() < 0:
        raise VolumeError(f"ground truth {m.path.name} is not a label image (non-integer or negative values)",
                          "give integer class labels (0 = background)")
    return labels
