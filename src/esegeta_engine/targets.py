"""Targets: model output -> per-class scalar scores ``(N, K)``.

Attribution methods explain a scalar. A target turns a segmentation map
``(N, K, *spatial)`` (2D or 3D) or classification logits ``(N, K)`` into one
score per class, keeping the gradient path to the model output intact, so
every gradient method sees real, non-zero gradients.

Regions (the argmax map, the Otsu mask) are frozen from the unperturbed
prediction by :meth:`Target.prepare` by default: perturbation methods then
measure how the score inside a fixed region changes, not how the region moves.
``frozen=False`` recomputes them per forward pass, as TorchEsegeta did.

Examples
--------
>>> import torch
>>> from esegeta_engine.targets import ArgmaxRegionTarget
>>> out = torch.randn(1, 3, 4, 4, 4, requires_grad=True)   # 3D, 3 classes
>>> t = ArgmaxRegionTarget()
>>> t.prepare(out.detach())
>>> t(out).shape
torch.Size([1, 3])
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn

from esegeta_engine.errors import TargetError

ACTIVATIONS = ("none", "softmax", "sigmoid")


def _activation(name: str) -> nn.Module:
    if name == "none":
        return nn.Identity()
    if name == "softmax":
        return nn.Softmax(dim=1)
    if name == "sigmoid":
        return nn.Sigmoid()
    raise TargetError(f"unknown activation {name!r}", f"use one of {', '.join(ACTIVATIONS)}")


def _tile(frozen: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat a frozen per-input tensor for a batch of perturbed copies.

    Integrated Gradients, Occlusion and Feature Ablation stack perturbed copies
    input-major (``[x0, x1, x0', x1', ...]``), so the frozen batch is tiled. Other
    Captum methods (NoiseTunnel, the SHAP family) stack example-major; the engine
    therefore explains one input at a time, except for batch-only methods
    (Feature Permutation), which do not expand the batch.
    """
    n = frozen.shape[0]
    if batch == n:
        return frozen
    if batch % n:
        raise TargetError(
            f"model output batch {batch} is not a multiple of the explained batch {n}",
            "this is a bug in the method's batching; please report it",
        )
    return frozen.repeat(batch // n, *([1] * (frozen.dim() - 1)))


def channel_argmax(output: torch.Tensor) -> torch.Tensor:
    """``output.argmax(dim=1)`` over the class axis, one channel at a time.

    Equal to ``torch.argmax(output, dim=1)``, ties and NaN included (the first largest, the first
    NaN), but a pass of elementwise comparisons per channel: torch's argmax over a strided axis of a
    whole-brain output ``(1, 2, 197, 233, 189)`` takes 2-4 s on a CPU, this 0.1-0.3 s — time in which
    no Cancel can be honoured (issue 19).
    """
    n = output.shape[1]
    best = output[:, 0]
    index = torch.zeros(best.shape, dtype=torch.long, device=output.device)
    for c in range(1, n):
        channel = output[:, c]
        index.masked_fill_((channel > best) | (channel.isnan() & ~best.isnan()), c)
        best = torch.maximum(best, channel)  # NaN propagates: a later channel never beats it
    return index


def present_labels(labels: torch.Tensor, n: int) -> list[int]:
    """The values in ``0..n-1`` that occur in ``labels`` (``torch.unique`` sorts: seconds on a whole brain)."""
    return torch.bincount(labels.flatten(), minlength=n).nonzero().flatten().tolist()


class Target(nn.Module):
    """Base class: ``target(output) -> (N, K)`` scores with a gradient path.

    Subclasses set :attr:`kind` and implement :meth:`forward`; they may freeze
    state from the unperturbed output in :meth:`prepare`.
    """

    kind: str = "target"

    def __init__(self, activation: str = "none") -> None:
        super().__init__()
        self.activation_name = activation
        self.activation = _activation(activation)

    def prepare(self, output: torch.Tensor) -> None:
        """Freeze whatever the target needs from the unperturbed ``output``."""

    def capture(self, model: nn.Module) -> AbstractContextManager[None]:
        """Context around one forward pass of ``model`` whose output this target will score.

        Targets that score something inside the model rather than its output (a layer's
        channel, :class:`~esegeta_engine.channel_target.LayerChannelTarget`) register their
        hooks here, only for that pass; output targets need nothing.
        """
        return contextlib.nullcontext()

    def default_classes(self, output: torch.Tensor) -> list[int]:
        """Classes worth explaining by default for this ``output``."""
        return list(range(self.n_scores(output)))

    def n_scores(self, output: torch.Tensor) -> int:
        """Number of scores (classes) this target produces for ``output``."""
        return int(output.shape[1])

    def class_label(self, index: int) -> str:
        """Short label of score ``index`` for file and layer names."""
        return f"class{index}"

    @staticmethod
    def _check_spatial(output: torch.Tensor, what: str) -> None:
        if output.dim() < 4:
            raise TargetError(
                f"the {what} target needs a segmentation output (N, K, *spatial) but the model "
                f"returned shape {tuple(output.shape)}",
                "use target kind 'classification' for a classifier, or select the segmentation "
                "output with model.output",
            )


class ArgmaxRegionTarget(Target):
    """Sum of class-k scores over the voxels predicted as class k (TorchEsegeta).

    Parameters
    ----------
    activation : {"none", "softmax", "sigmoid"}
        Applied to the output over the class axis before summing.
    frozen : bool
        Freeze the argmax region from the unperturbed output (default) or
        recompute it per forward pass.
    """

    kind = "argmax"

    def __init__(self, activation: str = "none", frozen: bool = True) -> None:
        super().__init__(activation)
        self.frozen = frozen
        self.register_buffer("region", torch.empty(0, dtype=torch.long), persistent=False)
        self.classes = 0  # of the frozen region

    def prepare(self, output: torch.Tensor) -> None:
        self._check(output)
        region = channel_argmax(output.detach())
        self.classes = output.shape[1]
        # the smallest integer type that holds every class: a whole scan's labels at 1 byte a voxel, not 8
        self.region = region.to(torch.uint8 if output.shape[1] <= 256 else torch.int32)

    def _check(self, output: torch.Tensor) -> None:
        self._check_spatial(output, "argmax region")
        if output.shape[1] < 2:
            raise TargetError(
                "the argmax region target needs at least 2 output channels, the model has 1",
                "use target kind 'otsu' for a single-channel (binary) model",
            )

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        self._check(output)
        if self.frozen and self.region.numel():
            labels = _tile(self.region, output.shape[0])
        else:
            labels = channel_argmax(output.detach())
        return _Masked.apply(self.activation(output), labels, output.shape[1]).flatten(2).sum(-1)

    @property
    def onehot(self) -> torch.Tensor:
        """The frozen region as a ``bool`` one-hot ``(N, K, *spatial)``, built from the labels on each call."""
        if not self.region.numel():
            return torch.empty(0, dtype=torch.bool)
        return _one_hot(self.region, self.classes, torch.bool)

    def default_classes(self, output: torch.Tensor) -> list[int]:
        present = present_labels(channel_argmax(output.detach()), output.shape[1])
        fg = [int(c) for c in present if c != 0]
        return fg or [int(c) for c in present]


class _Masked(torch.autograd.Function):
    """``a`` times the one-hot of ``labels``, saving the integer labels for the backward, not a one-hot.

    The same products as a multiply by the float one-hot, both ways (``g * onehot`` is what autograd's
    multiply gives ``a``; a ``bool`` factor is promoted to 1.0 / 0.0), so every map is bit-identical.
    A ``bool`` one-hot exists only while one product is formed: on a whole scan the target holds its
    labels (1 byte a voxel), where a float one-hot held 4 bytes a voxel and class.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(labels)
        ctx.n = n
        return a * _one_hot(labels, n, torch.bool)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (labels,) = ctx.saved_tensors
        return g * _one_hot(labels, ctx.n, torch.bool), None, None


def _one_hot(labels: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``(N, *spatial)`` labels -> ``(N, n, *spatial)`` one-hot of ``dtype`` (``F.one_hot`` then ``movedim``
    builds an int64 copy channel-last first: 2-3× slower on a whole brain)."""
    return torch.stack([labels == k for k in range(n)], dim=1).to(dtype)


class OtsuThresholdTarget(Target):
    """Foreground/background scores of a single-channel map split by Otsu.

    The map (``activation`` applied to output channel ``channel``) is min-max
    normalised and thresholded with Otsu's method (scikit-image) to get a
    foreground mask; the scores are ``[sum of (1 - p) over background,
    sum of p over foreground]``. The mask is detached, the scores are not, so
    gradients reach the model — unlike TorchEsegeta's ``out/out`` version,
    whose gradients cancelled to zero.

    Parameters
    ----------
    activation : {"sigmoid", "none", "softmax"}
        ``sigmoid`` for a logit map; ``none`` if the model already outputs
        probabilities; ``softmax`` over channels, then ``channel`` is taken.
    channel : int
        Output channel holding the foreground map.
    frozen : bool
        Freeze the mask from the unperturbed output (default).
    """

    kind = "otsu"

    def __init__(self, activation: str = "sigmoid", channel: int = 0, frozen: bool = True) -> None:
        super().__init__(activation)
        self.channel = channel
        self.frozen = frozen
        self.register_buffer("foreground", torch.empty(0, dtype=torch.bool), persistent=False)

    def _probability(self, output: torch.Tensor) -> torch.Tensor:
        self._check_spatial(output, "Otsu threshold")
        if self.channel >= output.shape[1]:
            raise TargetError(
                f"Otsu target channel {self.channel} does not exist: the output has "
                f"{output.shape[1]} channel(s)",
                f"set target.channel to 0..{output.shape[1] - 1}",
            )
        return self.activation(output)[:, self.channel]

    @staticmethod
    def _otsu(prob: torch.Tensor) -> torch.Tensor:
        from skimage.filters import threshold_otsu

        masks = []
        for p in prob.detach().float().cpu().numpy():
            lo, hi = float(p.min()), float(p.max())
            if hi - lo < 1e-12:
                masks.append(np.zeros_like(p, dtype=bool))
                continue
            norm = (p - lo) / (hi - lo)
            masks.append(norm > threshold_otsu(norm))
        return torch.from_numpy(np.stack(masks)).to(prob.device)

    def prepare(self, output: torch.Tensor) -> None:
        self.foreground = self._otsu(self._probability(output.detach()))

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        prob = self._probability(output)
        if self.frozen and self.foreground.numel():
            fg = _tile(self.foreground, prob.shape[0])
        else:
            fg = self._otsu(prob)
        fg = fg.to(prob.dtype)
        background = ((1 - prob) * (1 - fg)).flatten(1).sum(-1)
        foreground = (prob * fg).flatten(1).sum(-1)
        return torch.stack([background, foreground], dim=1)

    def n_scores(self, output: torch.Tensor) -> int:
        return 2

    def default_classes(self, output: torch.Tensor) -> list[int]:
        return [1]

    def class_label(self, index: int) -> str:
        return ("background", "foreground")[index]


class RegionOfInterestTarget(Target):
    """Per-class scores summed inside a user mask ("why this vessel?").

    Parameters
    ----------
    mask : array-like
        Boolean/label mask on the model's output grid (spatial shape only, or
        with a leading batch axis); non-zero voxels form the region.
    activation : {"none", "softmax", "sigmoid"}
        Applied over the class axis before summing.
    """

    kind = "roi"

    def __init__(self, mask: torch.Tensor | np.ndarray, activation: str = "none") -> None:
        super().__init__(activation)
        m = torch.as_tensor(np.asarray(mask) != 0)
        if not bool(m.any()):
            raise TargetError(
                "the region-of-interest mask is empty",
                "draw at least one voxel in the mask (a Labels layer or a mask NIfTI)",
            )
        self.register_buffer("mask", m, persistent=False)

    def _mask_for(self, output: torch.Tensor) -> torch.Tensor:
        self._check_spatial(output, "region-of-interest")
        spatial = tuple(output.shape[2:])
        m = self.mask if self.mask.dim() == len(spatial) + 1 else self.mask.unsqueeze(0)
        if tuple(m.shape[1:]) != spatial:
            raise TargetError(
                f"the region-of-interest mask has shape {tuple(m.shape[1:])} but the model output "
                f"grid is {spatial}",
                "draw the mask on the input volume's grid (same shape as the image)",
            )
        return _tile(m, output.shape[0]).unsqueeze(1).to(output.dtype)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return (self.activation(output) * self._mask_for(output)).flatten(2).sum(-1)

    def default_classes(self, output: torch.Tensor) -> list[int]:
        m = self._mask_for(output[:1].detach()).bool()[:, 0]
        labels = channel_argmax(output[:1].detach())[m]
        if output.shape[1] == 1:
            return [0]
        return [int(torch.mode(labels).values)]


class VoxelTarget(Target):
    """Per-class scores of one voxel (or pixel).

    Parameters
    ----------
    index : sequence of int
        Position on the model's output grid, one index per spatial axis.
    activation : {"none", "softmax", "sigmoid"}
        Applied over the class axis first.
    """

    kind = "voxel"

    def __init__(self, index: Sequence[int], activation: str = "none") -> None:
        super().__init__(activation)
        self.index = tuple(int(i) for i in index)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        self._check_spatial(output, "voxel")
        spatial = tuple(output.shape[2:])
        if len(self.index) != len(spatial) or any(
            not 0 <= i < s for i, s in zip(self.index, spatial)
        ):
            raise TargetError(
                f"voxel {list(self.index)} is outside the output grid {list(spatial)}",
                f"give {len(spatial)} indices with 0 <= index < size on each axis",
            )
        return self.activation(output)[(slice(None), slice(None), *self.index)]

    def default_classes(self, output: torch.Tensor) -> list[int]:
        return [int(self.forward(output[:1].detach()).argmax(dim=1))]


class ClassificationTarget(Target):
    """Classification logits ``(N, K)``, or their softmax/sigmoid probabilities."""

    kind = "classification"

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 2:
            raise TargetError(
                f"the classification target needs logits (N, K) but the model returned shape "
                f"{tuple(output.shape)}",
                "for a segmentation model use target kind 'argmax', 'otsu', 'roi' or 'voxel'",
            )
        return self.activation(output)

    def default_classes(self, output: torch.Tensor) -> list[int]:
        return [int(self.forward(output[:1].detach()).argmax(dim=1))]
