"""Models for the CAM, FullGrad, RISE and extremal perturbation tests."""

from __future__ import annotations

import torch
from torch import nn

from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ClassificationTarget
from tiny_models import conv


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


class BiasNet(nn.Module):
    """Conv(stride 2)-BN-ReLU(inplace)-Conv-ReLU-pool-Linear, biases everywhere."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        C = conv(dims)
        self.conv1 = C(1, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4) if dims == 2 else nn.BatchNorm3d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = C(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(5, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.conv2(self.relu1(self.bn(self.conv1(x)))))
        return self.fc(self.pool(h).flatten(1))
