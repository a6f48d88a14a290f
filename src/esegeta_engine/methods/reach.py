"""Perturbations that cannot reach the explained region cost no evaluation.

Under sliding-window execution an ROI or voxel target reads the output of some patches
only (the *active* patches); the stitched output there depends on the input inside those
patches and nowhere else, whatever the network does inside a patch (instance norm
included). A perturbed copy that changes the input only outside every active patch
therefore scores exactly as the unperturbed input: :class:`ReachFilter` answers such
copies with the unperturbed score and sends the network only the copies that can
matter. A batch of copies none of which can matter costs no model evaluation at all.
The map is identical (the skipped score differences are exactly zero); the number of
skipped copies is reported in the map's notes.
"""

from __future__ import annotations

import torch
from torch import nn

from esegeta_engine.forward.sliding import SlidingWindow


class ReachFilter(nn.Module):
    """``score_model`` with copies that cannot reach the target's patches answered without evaluation.

    Parameters
    ----------
    score_model : ScoreModel
        A sliding-window score model whose form has a target support.
    inputs : torch.Tensor
        The unperturbed input ``(N, C, *spatial)``.
    """

    def __init__(self, score_model: nn.Module, inputs: torch.Tensor) -> None:
        super().__init__()
        self.score_model = score_model
        self.base = inputs.detach()
        self.base_scores: torch.Tensor | None = None
        self.skipped = 0
        self.copies = 0
        sw = score_model.runner
        assert isinstance(sw, SlidingWindow)
        grid = sw.grid(inputs.shape[2:], inputs.device)
        reach = torch.zeros(grid.padded, dtype=torch.bool, device=inputs.device)
        for p in sw.active_patches(grid):
            reach[grid.slices[p]] = True
        self.reach = grid.crop(reach[None, None])[0, 0]  # input voxels some active patch reads

    def can_reach(self, copies: torch.Tensor) -> torch.Tensor:
        """``(M,)`` bool: copy ``m`` changes the input inside an active patch."""
        n = self.base.shape[0]
        base = self.base.repeat(copies.shape[0] // n, *([1] * (self.base.dim() - 1)))
        changed = (copies != base).any(dim=1)  # (M, *spatial)
        return (changed & self.reach).flatten(1).any(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.base.shape[0]
        if x.shape[0] % n or x.shape[1:] != self.base.shape[1:]:
            return self.score_model(x)
        if self.base_scores is None:
            if torch.equal(x[:n], self.base):
                self.base_scores = self.score_model(x[:n]).detach()
                if x.shape[0] == n:
                    return self.base_scores.clone()
            else:
                return self.score_model(x)
        mask = self.can_reach(x)
        self.copies += x.shape[0]
        self.skipped += int((~mask).sum())
        out = self.base_scores.repeat(x.shape[0] // n, 1)
        if bool(mask.any()):
            out[mask] = self.score_model(x[mask]).to(out.dtype)
        return out


def reach_filter(score_model: nn.Module, inputs: torch.Tensor) -> ReachFilter | None:
    """A :class:`ReachFilter` when ``score_model`` runs patch-wise for a target with a support."""
    runner = getattr(score_model, "runner", None)
    if not isinstance(runner, SlidingWindow) or runner.support is None:
        return None
    return ReachFilter(score_model, inputs)
