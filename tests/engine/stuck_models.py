"""Models that misbehave in time: a forward that never returns, a forward that counts its calls."""

from __future__ import annotations

import threading

import torch

from tiny_models import TinySegNet

RELEASE = threading.Event()
"""Set it to let every blocked forward return (tests set it when they are done)."""
ENTERED = threading.Event()
"""Set when a forward starts to block."""
CALLS = {"forward": 0, "blocked": 0, "returned": 0}


class StuckOnGradSegNet(TinySegNet):
    """TinySegNet whose first forward on an input that requires grad blocks on :data:`RELEASE`.

    The prediction pass and perturbation methods run normally; the first gradient method
    hangs in its forward, like a model stuck in C code (nothing in the engine can interrupt
    it). Later calls run normally.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS["forward"] += 1
        if x.requires_grad and not CALLS["blocked"]:
            CALLS["blocked"] += 1
            ENTERED.set()
            RELEASE.wait()
            CALLS["returned"] += 1
        return super().forward(x)


class CountingSegNet(TinySegNet):
    """TinySegNet that counts its forward calls (patch batches under a sliding window)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CALLS["forward"] += 1
        return super().forward(x)


def reset() -> None:
    RELEASE.clear()
    ENTERED.clear()
    CALLS.update(forward=0, blocked=0, returned=0)


class AutocastClashSegNet(TinySegNet):
    """TinySegNet ending in an op that refuses mixed dtypes: fine in fp32, fails under bf16 autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = super().forward(x)
        return torch.lerp(h, torch.zeros(h.shape, dtype=torch.float32), 0.0)


class SpinningSegNet(TinySegNet):
    """TinySegNet whose first forward on an input that requires grad computes forever in torch ops (C++)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and not CALLS["blocked"]:
            CALLS["blocked"] += 1
            a = torch.rand(64, 64)
            while True:  # noqa: ASYNC110 - never returns, by design
                a = torch.tanh(a @ a)
        return super().forward(x)
