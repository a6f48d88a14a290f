"""nnU-Net's own numbers carrying the gradient of the same steps written in torch.

The pipeline computes every value with nnU-Net's functions (numpy) and adds the derivative of a
torch version of the step: ``value + (s - s.detach())`` (:func:`exact`). The torch version only carries
the gradient, but its graph is large: the preprocessing's normalisation and per-axis float64
resampling store several scan-size tensors, and they would be held while the backward recomputes
every network patch. :class:`GradientSteps` runs those torch steps as one block, so activation
checkpointing (:mod:`esegeta_engine.forward.checkpointing`, the pipeline names the block among its
``checkpoint_segments``) keeps only the block's input, the scan, and recomputes the steps once when
the gradient reaches them. Without checkpointing it simply runs them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def exact(value: np.ndarray, surrogate: Callable[[], torch.Tensor] | None, like: torch.Tensor) -> torch.Tensor:
    """nnU-Net's own ``value``; with ``surrogate`` (the same step in torch) its gradient is added.

    ``value + (s - s.detach())`` has exactly nnU-Net's numbers and ``s``'s derivative.
    """
    out = torch.from_numpy(np.ascontiguousarray(value)).to(like.device)
    if surrogate is None:
        return out
    s = surrogate()
    return out.to(s.dtype) + (s - s.detach())


class GradientSteps(nn.Module):
    """``fn(data)``: torch steps that only carry a gradient, as one block activation checkpointing can wrap.

    Kept out of the pipeline's submodules (it is no layer of the model); the pipeline lists it in
    ``checkpoint_segments()``.
    """

    def forward(self, fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor) -> torch.Tensor:
        return fn(data)
