"""The padding search (``divisible_by: auto``) runs on a small crop with the volume's remainders, not on the
whole volume (issue 19: a whole-brain search ran the whole network up to five times)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.io import Volume
from esegeta_engine.jobs.build import padding_search_input


class NeedsFour(nn.Module):
    """Refuses sizes that are not multiples of 4 (as a two-level U-Net does); records every call's size."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(1, 2, 1)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape[2:]))
        if any(s % 4 for s in x.shape[2:]):
            raise RuntimeError(f"spatial size must be a multiple of 4, got {tuple(x.shape[2:])}")
        return self.conv(x)


@pytest.mark.parametrize("shape", [(197, 101, 9), (197, 233)])
def test_padding_is_searched_on_a_crop_with_the_same_remainders(shape) -> None:
    net = NeedsFour(len(shape)).eval()
    vol = Volume(np.random.default_rng(0).random(shape).astype(np.float32), np.eye(4))
    ex = Explainer(net, PreprocessConfig(spatial_dims=len(shape)), TargetConfig(classes=[1]))
    out = ex.raw_output(ex.prepare_input(vol))
    assert tuple(out.shape[2:]) == shape  # cropped back
    padded = tuple(-(-s // 4) * 4 for s in shape)
    crop = tuple(s if s < 96 else 64 + s % 32 for s in shape)
    # the whole volume once as it is (refused), the search on the crop (2**1 refused, 2**2 taken), then the
    # whole volume once, padded
    assert net.calls[0] == shape and net.calls[-1] == padded
    assert net.calls[1:-1] == [tuple(-(-c // 2) * 2 for c in crop), tuple(-(-c // 4) * 4 for c in crop)]
    assert ex._divisible == 4


def test_search_crop_keeps_each_axis_remainder_mod_32() -> None:
    x = torch.zeros(2, 3, 197, 233, 40)
    c = padding_search_input(x)
    assert c.shape == (1, 3, 69, 73, 40)
    assert all(a % 32 == b % 32 for a, b in zip(c.shape[2:], x.shape[2:]))


class FixedSize(nn.Module):
    """A network that takes exactly one input size (like UNETR's ``img_size``)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv3d(1, 2, 1)
        self.sizes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[2:]))
        if tuple(x.shape[2:]) != (self.size,) * 3:
            raise RuntimeError(f"img_size mismatch {tuple(x.shape)}")
        return self.conv(x)


def test_a_padding_the_crop_takes_but_the_whole_volume_does_not_is_a_clear_refusal() -> None:
    """Review finding: the crop (68 -> 96) took the padding, the whole 100³ (-> 128) did not, and the
    retry's RuntimeError escaped as a traceback; now it is the model's refusal, and no padding is kept."""
    from esegeta_engine.errors import EsegetaError

    net = FixedSize(96).eval()
    ex = Explainer(net, PreprocessConfig(), TargetConfig(kind="argmax"), None)
    with pytest.raises(EsegetaError, match="does not accept an input of shape"):
        ex.raw_output(torch.zeros(1, 1, 100, 100, 100))
    assert (96, 96, 96) in net.sizes  # the crop did take a padding
    assert ex._divisible == 1  # not left padding later calls
