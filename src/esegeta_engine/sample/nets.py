"""Small, attribution-friendly networks used by the embedded sample.

Both models are written so that hook-based attribution libraries (Captum)
work out of the box: every nonlinearity is a distinct, non-inplace
``nn.ReLU`` module that is executed exactly once per forward pass, batch
normalisation is used instead of instance normalisation, and both models are
TorchScript-scriptable.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["UNet", "TinyClassifier2D"]


def _layers(spatial_dims: int) -> tuple[type[nn.Module], ...]:
    """Return (Conv, ConvTranspose, BatchNorm, MaxPool) classes for 2D or 3D."""
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d
    if spatial_dims == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d, nn.MaxPool3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class ConvBlock(nn.Module):
    """Two (conv 3, batch norm, ReLU) stages with their own ReLU modules.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    in_channels : int
        Number of input channels.
    out_channels : int
        Number of output channels.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv, _, norm, _ = _layers(spatial_dims)
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply both stages."""
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(x)))


class DownBlock(nn.Module):
    """Max-pool by 2 followed by a :class:`ConvBlock`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _, _, _, pool = _layers(spatial_dims)
        self.pool = pool(kernel_size=2, stride=2)
        self.block = ConvBlock(spatial_dims, in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample and convolve."""
        return self.block(self.pool(x))


class UpBlock(nn.Module):
    """Transposed-conv upsampling, skip concatenation and a :class:`ConvBlock`."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        _, convt, _, _ = _layers(spatial_dims)
        self.up = convt(in_channels, out_channels, kernel_size=2, stride=2)
        self.block = ConvBlock(spatial_dims, 2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``x``, concatenate ``skip`` on channels and convolve."""
        return self.block(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """A small 2D/3D U-Net returning per-voxel class logits.

    Parameters
    ----------
    spatial_dims : int
        2 for images (N, C, X, Y) or 3 for volumes (N, C, X, Y, Z).
    in_channels : int
        Number of input channels.
    out_channels : int
        Number of output classes (logit channels).
    features : tuple of int
        Channels per resolution level; the last entry is the bottleneck.
        Spatial sizes must be divisible by ``2 ** (len(features) - 1)``.

    Notes
    -----
    The output has shape (N, out_channels, *spatial) and contains raw logits
    (apply softmax / argmax yourself).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: tuple[int, ...] = (8, 16, 32),
    ) -> None:
        super().__init__()
        conv, _, _, _ = _layers(spatial_dims)
        if len(features) < 2:
            raise ValueError("features needs at least two levels")
        feats = [int(f) for f in features]
        self.spatial_dims = spatial_dims
        self.required_multiple = 2 ** (len(feats) - 1)
        self.stem = ConvBlock(spatial_dims, in_channels, feats[0])
        self.downs = nn.ModuleList(
            [DownBlock(spatial_dims, feats[i], feats[i + 1]) for i in range(len(feats) - 1)]
        )
        self.ups = nn.ModuleList(
            [UpBlock(spatial_dims, feats[i + 1], feats[i]) for i in reversed(range(len(feats) - 1))]
        )
        self.head = conv(feats[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Parameters
        ----------
        x : torch.Tensor
            Input of shape (N, in_channels, *spatial).

        Returns
        -------
        torch.Tensor
            Logits of shape (N, out_channels, *spatial).

        Raises
        ------
        ValueError
            If the input rank is wrong or a spatial size is not a multiple of
            ``required_multiple``.
        """
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                "UNet expects input of shape (N, C, *spatial) with "
                + str(self.spatial_dims) + " spatial dims, got " + str(x.dim()) + " dims"
            )
        for size in x.shape[2:]:
            if size % self.required_multiple != 0:
                raise ValueError(
                    "UNet input spatial size must be a multiple of "
                    + str(self.required_multiple) + ", got spatial shape " + str(list(x.shape[2:]))
                )
        x = self.stem(x)
        skips: List[torch.Tensor] = [x]
        for down in self.downs:
            x = down(x)
            skips.append(x)
        n = len(skips)
        for i, up in enumerate(self.ups):
            x = up(x, skips[n - 2 - i])
        return self.head(x)


class TinyClassifier2D(nn.Module):
    """Tiny 2D CNN classifier: (conv, BN, ReLU, pool) x 2, GAP, linear.

    Parameters
    ----------
    in_channels : int
        Number of input channels.
    n_classes : int
        Number of output classes (logits).
    width : int
        Channels of the first convolution (the second has twice as many).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute class logits of shape (N, n_classes) from (N, C, X, Y)."""
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(self.gap(x), 1))
