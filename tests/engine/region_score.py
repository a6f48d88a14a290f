"""An analytic model for the perturbation tests: class 0 scores the sum of the input over a region."""

from __future__ import annotations

import torch
from torch import nn

from esegeta_engine.scoring import ScoreModel
from esegeta_engine.targets import ClassificationTarget


class RegionScore(nn.Module):
    """(N, 1, *s) -> (N, 3) scores: the sum of x over the region, the sum outside it, and the
    contrast ``sum(w x)`` with ``w = 1`` inside and ``-|region| / |outside|`` outside (mean-free
    weights: its value under random masking fluctuates around 0, so sampling methods converge fast)."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        inside = region.float().reshape(1, *region.shape)
        contrast = inside - (1 - inside) * inside.sum() / (1 - inside).sum()
        self.register_buffer("weight", torch.cat([inside, 1 - inside, contrast]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.flatten(1).T


def region_setup(dims: int, size: int = 8, n: int = 1) -> tuple[torch.Tensor, torch.Tensor, ScoreModel]:
    """A box region (1/8 of the voxels in 2D, 1/16 in 3D), a positive input, and its score model."""
    region = torch.zeros((size,) * dims, dtype=torch.bool)
    half = size // 2
    box = (slice(1, 1 + half), slice(2, 2 + half // 2)) + (slice(3, 3 + half),) * (dims - 2)
    region[box] = True
    torch.manual_seed(0)
    x = torch.rand(n, 1, *(size,) * dims) + 0.5
    return region, x, ScoreModel(RegionScore(region), ClassificationTarget())
