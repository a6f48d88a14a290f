"""The window grid's count map (forward/window_grid.py): built on demand, and per patch bit-identical.

The patch-wise backward divides each patch's share of the upstream gradient by the count map over that
patch only (:meth:`WindowGrid.count_at`), so no whole-scan count map is kept; the values must be the
whole map's exactly (the same weights added in the same patch order), or maps would change in the last bit.
"""

from __future__ import annotations

import pytest
import torch

from esegeta_engine.forward.window_grid import WindowGrid, WindowSettings


@pytest.mark.parametrize("spatial,patch,overlap,blend", [
    ((26, 21), (12, 12), 0.25, "gaussian"), ((30, 17), (8, 8), 0.5, "constant"),
    ((14, 12, 11), (8, 8, 8), 0.25, "gaussian"), ((6, 12, 11), (8, 8, 8), 0.6, "gaussian")])
def test_count_at_equals_the_whole_count_map_bit_for_bit(spatial, patch, overlap, blend):
    grid = WindowGrid(spatial, WindowSettings(patch, overlap, blend), torch.device("cpu"))
    whole = grid.count
    assert len(grid) > 1 and whole.shape == (1, 1, *grid.padded)
    for p, sl in enumerate(grid.slices):
        assert torch.equal(grid.count_at(p), whole[(slice(None), slice(None), *sl)])


def test_the_count_map_is_not_kept_by_the_grid():
    grid = WindowGrid((40, 40, 24), WindowSettings((16, 16, 16)), torch.device("cpu"))
    assert torch.equal(grid.count, grid.count)
    assert not any(isinstance(v, torch.Tensor) and v.shape == (1, 1, *grid.padded) for v in vars(grid).values())


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("spatial,patch,overlap", [
    ((27, 19), (8, 6), 0.25), ((31, 23), (9, 7), 0.75), ((13, 40), (13, 10), 0.5), ((5, 9), (8, 8), 0.25),
    ((19, 15, 13), (7, 6, 5), 0.25), ((17, 21, 9), (5, 8, 9), 0.6), ((11, 12, 13), (4, 4, 4), 0.0)])
def test_count_at_from_per_axis_tables_equals_the_loop_over_patches(spatial, patch, overlap, blend):
    """The O(patch) count (the overlapping patches from per-axis starts) against the loop over every
    patch it replaces, bit for bit: odd sizes, odd patches, 2D and 3D, both blend modes."""
    grid = WindowGrid(spatial, WindowSettings(patch, overlap, blend), torch.device("cpu"))
    assert grid._axis_starts is not None  # MONAI's grid is a product of per-axis starts
    whole = grid.count
    for p, sl in enumerate(grid.slices):
        fast = grid.count_at(p)
        assert torch.equal(fast, grid._count_at_by_loop(p))
        assert torch.equal(fast, whole[(slice(None), slice(None), *sl)])


def test_count_at_of_a_grid_that_is_not_a_product_uses_the_loop():
    grid = WindowGrid((20, 20), WindowSettings((8, 8)), torch.device("cpu"))
    grid.slices = grid.slices[:-1]  # one patch missing: no longer the product of per-axis starts
    from esegeta_engine.forward.window_grid import _product_starts

    grid._axis_starts = _product_starts(grid.slices)
    assert grid._axis_starts is None
    for p in range(len(grid.slices)):  # the fallback against the count map (an independent loop over slices)
        assert torch.equal(grid.count_at(p), grid.count[(slice(None), slice(None), *grid.slices[p])])
