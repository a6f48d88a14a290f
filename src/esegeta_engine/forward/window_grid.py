"""The patches of a sliding window: settings, slices, importance weights (MONAI's numbers).

:class:`WindowSettings` is a config's ``execution`` section; :class:`WindowGrid` the patches of one
input size, with MONAI's padding, ``dense_patch_slices`` and ``compute_importance_map``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esegeta_engine.errors import MethodError

Slices = tuple[slice, ...]


@dataclass(frozen=True)
class WindowSettings:
    """Sliding-window settings (the ``execution`` section of a config).

    Attributes
    ----------
    patch_size : tuple of int
        Patch (window) size per spatial axis, the network's training size.
    overlap : float
        Fraction of a patch shared with its neighbour, in [0, 1).
    blend : {"gaussian", "constant"}
        Importance weighting of each patch's output (nnU-Net and MONAI use Gaussian).
    sw_batch_size : int
        Patches per model evaluation.
    padding : {"constant", "reflect", "replicate"}
        How a volume smaller than the patch is padded (MONAI's ``padding_mode``).
    sigma_scale : float
        Gaussian sigma as a fraction of the patch size (MONAI's default 0.125).
    """

    patch_size: tuple[int, ...]
    overlap: float = 0.25
    blend: str = "gaussian"
    sw_batch_size: int = 1
    padding: str = "constant"
    sigma_scale: float = 0.125

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise MethodError(f"execution.overlap {self.overlap} is outside [0, 1)",
                              "use e.g. 0.25 or 0.5 (the fraction of a patch shared with its neighbour)")
        if any(int(p) < 1 for p in self.patch_size):
            raise MethodError(f"execution.patch_size {list(self.patch_size)} has a size below 1",
                              "give the network's training patch size, e.g. [96, 96, 96]")


class WindowGrid:
    """The patches of one input size: padding, slices, importance map and count map.

    Parameters
    ----------
    spatial : sequence of int
        Spatial size of the input.
    settings : WindowSettings
        Patch size, overlap, blending.
    device : torch.device
        Where the weights live.
    """

    def __init__(self, spatial: Sequence[int], settings: WindowSettings, device: torch.device) -> None:
        nd = len(spatial)
        if len(settings.patch_size) != nd:
            raise MethodError(f"execution.patch_size {list(settings.patch_size)} has "
                              f"{len(settings.patch_size)} axes for a {nd}D input",
                              f"give {nd} sizes (or one size for every axis)")
        self.spatial = tuple(int(s) for s in spatial)
        roi = tuple(int(p) for p in settings.patch_size)
        self.roi = roi
        self.padded = tuple(max(s, r) for s, r in zip(self.spatial, roi))
        pad: list[int] = []  # F.pad order: last axis first, (before, after)
        for k in range(nd - 1, -1, -1):
            diff = max(roi[k] - self.spatial[k], 0)
            pad.extend([diff // 2, diff - diff // 2])
        self.pad = pad
        self.offset = tuple(pad[2 * (nd - 1 - k)] for k in range(nd))  # padding before each axis
        interval = tuple(r if r == s else max(int(r * (1 - settings.overlap)), 1)
                         for r, s in zip(roi, self.padded))
        from monai.data.utils import compute_importance_map, dense_patch_slices  # here: MONAI costs ~115 MB resident

        self.slices: list[Slices] = [tuple(sl) for sl in dense_patch_slices(self.padded, roi, interval)]
        self.weight = compute_importance_map(roi, mode=settings.blend, sigma_scale=settings.sigma_scale,
                                             device=device, dtype=torch.float32)[None, None]
        self.padding_mode = settings.padding
        self._axis_starts = _product_starts(self.slices)

    @property
    def count(self) -> torch.Tensor:
        """The summed importance weights on the padded grid ``(1, 1, *padded)``, built when asked and
        not kept (a whole scan's worth: 100 MB at 448x448x128); :meth:`count_at` gives one patch's."""
        count = torch.zeros((1, 1, *self.padded), device=self.weight.device)
        for sl in self.slices:
            count[(slice(None), slice(None), *sl)] += self.weight
        return count

    def count_at(self, p: int) -> torch.Tensor:
        """:attr:`count` over patch ``p``'s window, bit-identical to it there, in O(patch) work.

        MONAI's patches are the Cartesian product of per-axis starts, listed with the last axis fastest
        (``dense_patch_slices``). The patches overlapping ``p`` are then the product of the starts near
        ``p`` on each axis, and listing that product in lexicographic order visits them in patch order:
        the same weights are added in the same order as :attr:`count` adds them (no assumption that the
        importance map is separable, so Gaussian blending is exact too), without a pass over every
        patch of the grid. A grid that is not such a product (never MONAI's) uses the loop over patches.
        """
        if self._axis_starts is None:
            return self._count_at_by_loop(p)
        own = self.slices[p]
        near = [[s for s in starts if s < sl.stop and s + r > sl.start]
                for sl, starts, r in zip(own, self._axis_starts, self.roi)]
        out = torch.zeros((1, 1, *self.roi), device=self.weight.device)
        for begin in itertools.product(*near):  # lexicographic: the patch order
            dst = tuple(slice(max(s, b.start) - b.start, min(s + r, b.stop) - b.start)
                        for s, r, b in zip(begin, self.roi, own))
            src = tuple(slice(max(s, b.start) - s, min(s + r, b.stop) - s) for s, r, b in zip(begin, self.roi, own))
            out[(slice(None), slice(None), *dst)] += self.weight[(slice(None), slice(None), *src)]
        return out

    def _count_at_by_loop(self, p: int) -> torch.Tensor:
        """The same as :meth:`count_at` by adding every overlapping patch's weights in patch order."""
        own = self.slices[p]
        out = torch.zeros((1, 1, *self.roi), device=self.weight.device)
        for sl in self.slices:
            inter = [(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sl, own)]
            if any(lo >= hi for lo, hi in inter):
                continue
            dst = tuple(slice(lo - b.start, hi - b.start) for (lo, hi), b in zip(inter, own))
            src = tuple(slice(lo - a.start, hi - a.start) for (lo, hi), a in zip(inter, sl))
            out[(slice(None), slice(None), *dst)] += self.weight[(slice(None), slice(None), *src)]
        return out

    def __len__(self) -> int:
        return len(self.slices)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pad ``x`` to the padded grid (MONAI's padding of volumes smaller than a patch)."""
        if not any(self.pad):
            return x
        return F.pad(x, self.pad, mode=self.padding_mode)

    def crop(self, y: torch.Tensor) -> torch.Tensor:
        """Crop a padded-grid tensor back to the input grid."""
        if not any(self.pad):
            return y
        sl = tuple(slice(o, o + s) for o, s in zip(self.offset, self.spatial))
        return y[(slice(None), slice(None), *sl)]

    def patches_overlapping(self, support: torch.Tensor | None) -> list[int]:
        """Indices of patches whose output window touches ``support`` (input grid, bool)."""
        if support is None:
            return list(range(len(self.slices)))
        padded = torch.zeros(self.padded, dtype=torch.bool, device=support.device)
        padded[tuple(slice(o, o + s) for o, s in zip(self.offset, self.spatial))] = support
        return [i for i, sl in enumerate(self.slices) if bool(padded[sl].any())]


def _product_starts(slices: list[Slices]) -> list[list[int]] | None:
    """Each axis's sorted patch starts, if ``slices`` are their Cartesian product in lexicographic
    order (last axis fastest, as MONAI's ``dense_patch_slices`` lists them), else ``None``."""
    if not slices:
        return None
    nd = len(slices[0])
    starts = [sorted({sl[a].start for sl in slices}) for a in range(nd)]
    listed = [tuple(sl[a].start for a in range(nd)) for sl in slices]
    return starts if listed == list(itertools.product(*starts)) else None
