"""Tiny models for the method matrix and the analytic checks (2D and 3D)."""

from __future__ import annotations

import torch
from torch import nn

from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget, ClassificationTarget


def conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


class TinySegNet(nn.Module):
    """Conv-ReLU-Conv-ReLU-Conv(1x1): (N, C, *s) -> (N, K, *s); distinct ReLU modules."""

    def __init__(self, dims: int = 3, in_channels: int = 1, classes: int = 2) -> None:
        super().__init__()
        C = conv(dims)
        self.conv1 = C(in_channels, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = C(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.head = C(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu2(self.conv2(self.relu1(self.conv1(x)))))


class TinyClassifier(nn.Module):
    """Conv-ReLU-pool-Linear: (N, C, *s) -> (N, K)."""

    def __init__(self, dims: int = 3, in_channels: int = 1, classes: int = 3) -> None:
        super().__init__()
        C = conv(dims)
        self.conv1 = C(in_channels, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = C(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))))


class LinearSeg(nn.Module):
    """A 1x1 convolution: each output voxel is a linear function of its input voxel."""

    def __init__(self, dims: int = 3, in_channels: int = 1, classes: int = 2) -> None:
        super().__init__()
        self.conv = conv(dims)(in_channels, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LinearScore(nn.Module):
    """f(x) = <w_k, x> + b_k: an analytic classifier over a whole image/volume."""

    def __init__(self, shape: tuple[int, ...], classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, *shape, generator=g))
        self.bias = nn.Parameter(torch.randn(classes, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.flatten(1).T + self.bias


class NormNet(nn.Module):
    """Conv-InstanceNorm-LeakyReLU-Conv: scale-invariant after the first convolution."""

    def __init__(self, dims: int = 3) -> None:
        super().__init__()
        C = conv(dims)
        norm = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
        self.conv1, self.norm, self.act = C(1, 4, 3, padding=1, bias=False), norm(4, affine=True), nn.LeakyReLU(0.1)
        self.head = C(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.norm(self.conv1(x))))


class SlowSegNet(TinySegNet):
    """TinySegNet that sleeps ``delay`` seconds per forward: long runs for timeout/cancel tests."""

    def __init__(self, dims: int = 3, in_channels: int = 1, classes: int = 2, delay: float = 0.01) -> None:
        super().__init__(dims, in_channels, classes)
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.delay)
        return super().forward(x)


# ---- shared set-ups of the method tests ---------------------------------------------------

SIZE = 8


def shape(dims: int) -> tuple[int, ...]:
    return (SIZE,) * dims


def seg_setup(dims: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, ScoreModel]:
    """TinySegNet whose head bias is shifted so that both classes are predicted."""
    torch.manual_seed(seed)
    net = TinySegNet(dims).eval()
    x = torch.randn(1, 1, *shape(dims))
    with torch.no_grad():
        out = net(x)
        net.head.bias[1] -= (out[:, 1] - out[:, 0]).median()
        out = net(x)
    labels = out.argmax(dim=1)
    assert bool((labels == 0).any()) and bool((labels == 1).any()), "both classes must occur"
    target = ArgmaxRegionTarget()
    target.prepare(out)
    return net, x, ScoreModel(net, target)


def cls_setup(dims: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, ScoreModel]:
    torch.manual_seed(seed)
    net = TinyClassifier(dims).eval()
    x = torch.randn(1, 1, *shape(dims))
    return net, x, ScoreModel(net, ClassificationTarget())


def assert_untouched(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """No hooks left, eval mode, parameters equal to ``state`` and still requiring grad."""
    for name, module in net.named_modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks"):
            assert not getattr(module, hooks), f"{hooks} left on module {name!r}"
        assert not module.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), f"parameter {key} changed"
    assert all(p.requires_grad for p in net.parameters())


class PickyNet(nn.Module):
    """A TorchScript-able segmenter that refuses inputs without 3 channels (a readable reason)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv3d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("PickyNet expects 3 input channels")
        return self.head(x)
