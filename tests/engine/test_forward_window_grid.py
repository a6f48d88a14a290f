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
