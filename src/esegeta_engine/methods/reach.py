"""Perturbations that cannot reach the explained region cost no evaluation.

An ROI or voxel target reads the output at a few voxels only (its *support*). The score can
change only if a perturbed copy changes the input somewhere those output voxels depend on (the
*reach*). :class:`ReachFilter` answers every copy that equals the unperturbed input on the
reach with the unperturbed score, and sends the network only the copies that can matter; a
batch of copies none of which can matter costs no model evaluation at all. The skipped score
differences are exactly zero, so the map is identical.

The reach is the receptive field of the support, from the linearised probe of
:mod:`esegeta_engine.forward.receptive` (a safe superset; computed once per map):

- whole-volume execution: one probe pass on the input's size;
- sliding-window execution: one probe pass on a patch and one backward per patch the target
  reads, each with the part of the support that patch's output covers (instance norm makes a
  patch's whole input count, and the reach is then those patches: the coarser bound, which needs
  no probe, and the one used when the probe meets an operation it does not know).

The skipped copies, the model evaluations saved and the probe's cost go into the map's notes and
its record (``execution.receptive_field``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from esegeta_engine.forward.receptive import ReceptiveFieldUnknown, dependency
from esegeta_engine.forward.runner import WholeVolume
from esegeta_engine.forward.sliding import SlidingWindow
from esegeta_engine.methods.notes import add_note, notes_of

if TYPE_CHECKING:  # pragma: no cover
    from esegeta_engine.methods.registry import MethodContext


class ReachFilter(nn.Module):
    """``score_model`` with copies that cannot reach the target's support answered without evaluation.

    Parameters
    ----------
    score_model : ScoreModel
        A score model whose form has a target support.
    inputs : torch.Tensor
        The unperturbed input ``(N, C, *spatial)``.
    """

    def __init__(self, score_model: nn.Module, inputs: torch.Tensor) -> None:
        super().__init__()
        self.score_model = score_model
        self.base = inputs.detach()
        self.base_scores: torch.Tensor | None = None
        self.skipped = 0  # copies answered with the unperturbed score
        self.copies = 0
        self.saved_calls = 0  # model calls (batches of copies) that never happened
        self.extra_calls = 0  # unperturbed evaluations the method itself would not have made
        self.reach, self.bound, self.probe_passes = reach_of(score_model, inputs)

    def can_reach(self, copies: torch.Tensor) -> torch.Tensor:
        """``(M,)`` bool: copy ``m`` changes the input somewhere the support depends on."""
        n = self.base.shape[0]
        base = self.base.repeat(copies.shape[0] // n, *([1] * (self.base.dim() - 1)))
        changed = (copies != base).any(dim=1)  # (M, *spatial)
        return (changed & self.reach).flatten(1).any(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.base.shape[0]
        if x.shape[0] % n or x.shape[1:] != self.base.shape[1:]:
            return self.score_model(x)
        if self.base_scores is None and torch.equal(x[:n], self.base):
            self.base_scores = self.score_model(x[:n]).detach()
            if x.shape[0] == n:
                return self.base_scores.clone()
        mask = self.can_reach(x)
        if self.base_scores is None:  # the method never asks for the unperturbed score (RISE)
            if bool(mask.all()):
                return self.score_model(x)
            self.base_scores = self.score_model(self.base).detach()
            self.extra_calls += 1
        self.copies += x.shape[0]
        self.skipped += int((~mask).sum())
        out = self.base_scores.repeat(x.shape[0] // n, 1)
        if bool(mask.any()):
            out[mask] = self.score_model(x[mask]).to(out.dtype)
        else:
            self.saved_calls += 1
        return out

    def record(self) -> dict[str, Any]:
        """What the filter saved, for the map's record."""
        return {"bound": self.bound, "probe_passes": self.probe_passes, "copies": self.copies,
                "skipped": self.skipped, "evaluations_saved": self.saved_calls - self.extra_calls,
                "reach_voxels": int(self.reach.sum())}


class Reached:
    """A perturbation method through a :class:`~esegeta_engine.methods.reach.ReachFilter`; reports
    the saving in the map's notes and record (``ctx.extra["receptive_field"]``, copied into the
    record's ``execution`` section)."""

    def __init__(self, algorithm: Any, reach: Any, ctx: MethodContext, method: str, what: str) -> None:
        self.algorithm, self.reach, self.ctx, self.method, self.what = algorithm, reach, ctx, method, what

    def attribute(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The wrapped method's ``attribute``, then :meth:`report`."""
        out = self.algorithm.attribute(inputs, *args, **kwargs)
        self.report()
        return out

    def report(self) -> None:
        """Put what the filter saved in the map's notes and record."""
        record = {**self.reach.record(), "unit": self.what}
        self.ctx.extra["skipped_perturbations"] = self.reach.skipped
        self.ctx.extra["receptive_field"] = record
        add_note(notes_of(self.ctx), (
            f"{self.method}: {self.reach.skipped} of {self.reach.copies} perturbed {self.what} cannot reach "
            f"the voxels the target reads ({record['bound']}) and cost no evaluation (their score change is "
            f"exactly 0); {record['evaluations_saved']} model evaluations saved"))


def reach_of(score_model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, str, int]:
    """The input voxels the support can depend on, the bound's name and the probe passes it took."""
    runner = score_model.runner
    spatial = tuple(inputs.shape[2:])
    shape = (1, inputs.shape[1], *spatial)
    if isinstance(runner, SlidingWindow):
        grid = runner.grid(spatial, inputs.device)
        active = runner.active_patches(grid)
        coarse = torch.zeros(grid.padded, dtype=torch.bool, device=inputs.device)
        for p in active:
            coarse[grid.slices[p]] = True
        support = torch.zeros(grid.padded, dtype=torch.bool, device=inputs.device)
        support[tuple(slice(o, o + s) for o, s in zip(grid.offset, grid.spatial))] = runner.support
        masks = [support[grid.slices[p]] for p in active]
        try:
            deps = _probe(runner.net, (1, inputs.shape[1], *grid.roi), masks, inputs.device)
        except ReceptiveFieldUnknown as exc:
            return grid.crop(coarse[None, None])[0, 0], f"patches the target reads (probe: {exc})", 0
        reach = torch.zeros_like(coarse)
        for p, d in zip(active, deps):
            reach[grid.slices[p]] |= d
        return grid.crop(reach[None, None])[0, 0], "receptive field (linearised probe)", 1
    whole = WholeVolume(runner.net, runner.divisible_by, runner.padding)  # no autocast: the probe is fp32
    try:
        (reach,) = _probe(whole, shape, [score_model.form.support.to(inputs.device)], inputs.device)
    except ReceptiveFieldUnknown as exc:
        return torch.ones(spatial, dtype=torch.bool, device=inputs.device), f"none (probe: {exc})", 1
    return reach, "receptive field (linearised probe)", 1


def _probe(net: Any, shape: tuple, masks: list, device: torch.device) -> list[torch.Tensor]:
    """:func:`dependency`; any failure of the probe itself (out of memory: a probe keeps a graph,
    occlusion does not) is reported as an unknown bound, named in the notes, and the method runs as
    it would without skipping."""
    try:
        return dependency(net, shape, masks, device)
    except ReceptiveFieldUnknown:
        raise
    except Exception as exc:  # the probe is an optimisation: it must never cost the user the map
        line = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ReceptiveFieldUnknown(f"{type(exc).__name__}: {line}") from None


def reach_filter(score_model: nn.Module, inputs: torch.Tensor) -> ReachFilter | None:
    """A :class:`ReachFilter` when ``score_model``'s target reads a support (ROI, voxel, component)."""
    runner = getattr(score_model, "runner", None)
    form = getattr(score_model, "form", None)
    if isinstance(runner, SlidingWindow):
        if runner.support is None:
            return None
    elif not isinstance(runner, WholeVolume) or getattr(form, "support", None) is None:
        return None
    return ReachFilter(score_model, inputs)
