"""Patch seams of sliding-window maps (issue 19.3): border planes from MONAI's patch positions,
seam strength 1 for a map without seams and > 1 for one with them, a patch-grid mask; 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest

from esegeta_engine.evaluation.seams import border_planes, patch_grid, seam_strength


@pytest.mark.parametrize("shape", [(20, 14), (20, 14, 11)])
def test_border_planes_follow_monais_windows(shape) -> None:
    from monai.data.utils import dense_patch_slices

    patch = (8,) * len(shape)
    planes = border_planes(shape, patch, 0.5)
    slices = dense_patch_slices(shape, patch, (4,) * len(shape))
    for k in range(len(shape)):
        expected = sorted({p for sl in slices for p in (sl[k].start, sl[k].stop - 1) if 0 < p < shape[k] - 1})
        assert planes[k] == expected and planes[k]
    mask = patch_grid(shape, patch, 0.5)
    assert mask.shape == shape and mask.take(planes[0], axis=0).all()
    assert not mask.take([0], axis=0).all()  # the volume's edge is not a seam


@pytest.mark.parametrize("shape", [(24, 24), (24, 24, 24)])
def test_seam_strength_is_one_without_seams_and_larger_with_them(shape) -> None:
    patch = (8,) * len(shape)
    flat = np.ones(shape)
    assert all(v == pytest.approx(1.0) for v in seam_strength(flat, patch, 0.25).values())
    seamy = flat.copy()
    planes = border_planes(shape, patch, 0.25)
    seamy[planes[0]] = 3.0  # the x border planes three times as strong
    s = seam_strength(seamy, patch, 0.25)
    assert s["x"] == pytest.approx(3.0) and s["y"] == pytest.approx(1.0)
    assert np.isnan(seam_strength(flat, (24,) * len(shape), 0.25)["x"])  # one patch: no interior border
