"""What a rule-based backward (LRP, excitation backprop) needs to know about the run around it.

The network inside the score model, the user's model inside an output selector, a probe input the
network itself takes (one patch under sliding windows), and the sliding window whose stitched forward
needs no graph. Split from :mod:`.lrp` so that module stays one thing (the rules' hooks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from esegeta_engine.forward.sliding import SlidingWindow
from esegeta_engine.models import OutputSelector


def network_of(score_model: nn.Module) -> nn.Module:
    """The module whose output relevance starts from: the user's model inside a ScoreModel."""
    net = getattr(score_model, "net", None)
    return net if isinstance(net, nn.Module) else score_model


def user_model(net: nn.Module) -> nn.Module:
    """The user's model inside an :class:`OutputSelector` (module names as the user knows them)."""
    return net.model if isinstance(net, OutputSelector) else net


def probe_input(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """An input the network itself takes: the first example, cropped to one patch under
    sliding-window execution (the canonizer's probe)."""
    x = inputs[:1].detach()
    sliding = getattr(getattr(model, "form", None), "sliding", None)
    if sliding is not None:
        patch = tuple(int(p) for p in sliding.patch_size)
        x = x[(slice(None), slice(None), *(slice(0, p) for p in patch))]
        pad = [v for s, p in zip(reversed(x.shape[2:]), reversed(patch)) for v in (0, p - s)]
        x = torch.nn.functional.pad(x, pad) if any(pad) else x
    return x


def sliding_window_of(score_model: nn.Module) -> SlidingWindow | None:
    """The sliding window a score model runs its network through, if any."""
    runner = getattr(score_model, "runner", None)
    return runner if isinstance(runner, SlidingWindow) else None


@contextlib.contextmanager
def quiet_stitched_forward(score_model: nn.Module) -> Iterator[None]:
    """Rule hooks act only in the patch-wise backward's recomputation: the stitched forward
    needs no graph (see :attr:`SlidingWindow.plain_forward`)."""
    sw = sliding_window_of(score_model)
    if sw is None:
        yield
        return
    before, sw.plain_forward = sw.plain_forward, True
    try:
        yield
    finally:
        sw.plain_forward = before
