"""DeepLIFT and DeepLIFT SHAP with the input and the reference as two passes (2D and 3D).

Same map as Captum's ``DeepLift`` / ``DeepLiftShap`` (see :mod:`.deeplift_rules` for the rules
and the one case where the forms differ), at about the memory of one forward + backward of the
input instead of a batch of two with every nonlinearity's activations copied twice.

**Whole volume.** Per baseline: the reference pass ``F(x0)`` without a graph keeps the rule
modules' inputs; the input pass ``F(x)`` computes each multiplier as it goes; one backward
gives the multipliers of ``x``, and the map is ``(x - x0) * m``. Two model evaluations per
baseline; the first also counts the module calls for the notes
(:class:`~.deeplift_safe.DeepLiftPlan`).

**Sliding window.** The stitched function is linear in its patch outputs, so each patch's
rule runs with its blended share of the upstream multiplier. ``F(x)`` is the prediction's
stitched output, reused (:meth:`SlidingWindow.remembered_output`). The backward recomputes one
patch batch at a time (:class:`~esegeta_engine.forward.sliding.SlidingWindow`); before each
batch, the same patches of the baseline run without a graph and keep the rule modules' inputs
(``before_recompute``), then the input's patches run with the multipliers. The baseline's patch
outputs give ``F(x0)`` on the way, so it costs no further patch: it is handed to the score model,
where the completeness check reads it.

Where the target is fixed weights of the stitched output (the frozen argmax region or an ROI mask,
without an activation: :func:`~esegeta_engine.forward.patchwise_backward.linear_weights`), no whole-scan
buffer beyond the input's gradient is made: the upstream of each patch is the target's weights there,
read from the labels or mask per patch (not the stitched output's gradient, 2 channels of the scan), and
``F(x0)`` is summed patch by patch from the baseline's patch outputs (not its stitched output, 2 more),
then handed over as scores. The map is bit-identical to the autograd path's; ``F(x0)`` equals the
stitched one within float rounding (the same sum in another order). Every other target takes that
autograd path through the stitched output. Patch evaluations: one
patch for counting module calls, then per baseline one pass of every patch of the baseline and
one forward + backward of every patch of the input. DeepLIFT SHAP reuses the input's forward for
every baseline row.
"""

from __future__ import annotations

from typing import Any

import torch
from captum._utils.common import _select_targets

from esegeta_engine.forward import sliding
from esegeta_engine.forward.patchwise_backward import LinearScore, linear_weights, patchwise_backward
from esegeta_engine.methods.deeplift_rules import Rules
from esegeta_engine.methods.deeplift_safe import DeepLiftPlan
from esegeta_engine.methods.notes import notes_of
from esegeta_engine.methods.registry import MethodContext


class TwoPassDeepLift:
    """DeepLIFT (``shap=False``) or DeepLIFT SHAP (the mean over the baselines' rows) of ``ctx.score_model``.

    Parameters
    ----------
    ctx : MethodContext
        The score model (whole volume or sliding window), for the notes too.
    method : str
        Method name for notes and errors.
    multiply_by_inputs : bool
        ``(x - x0) * m`` (default), or the multipliers ``m``.
    shap : bool
        Average over every row of ``baselines`` (each explained against every input).
    """

    def __init__(self, ctx: MethodContext, method: str, multiply_by_inputs: bool = True,
                 shap: bool = False) -> None:
        self.ctx, self.method, self.shap = ctx, method, shap
        self.forward_func = ctx.score_model
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    @staticmethod
    def has_convergence_delta() -> bool:
        return False

    def attribute(self, inputs: Any, baselines: Any = None, target: Any = 0, **_: Any) -> torch.Tensor:
        """Return the map, of the inputs' shape."""
        x = (inputs[0] if isinstance(inputs, tuple) else inputs).detach()
        base = (baselines[0] if isinstance(baselines, tuple) else baselines)
        base = torch.zeros_like(x) if base is None else torch.as_tensor(base).to(x)
        if self.shap:
            rows = [base[j:j + 1].expand_as(x) for j in range(base.shape[0])]
        else:
            rows = [base.expand_as(x)]
        model = self.ctx.score_model
        rules = Rules(model, self.method)
        try:
            if getattr(model, "patchwise", False):
                grads = self._patchwise(x, rows, target, rules)
            else:
                grads = [self._whole(x, b, target, rules, first=j == 0) for j, b in enumerate(rows)]
        finally:
            rules.close()
        maps = [(x - b) * g if self._multiply_by_inputs else g for b, g in zip(rows, grads)]
        return sum(maps[1:], maps[0]) / len(maps)

    attribute.__wrapped__ = attribute  # type: ignore[attr-defined]  # NoiseTunnel calls __wrapped__

    # -- whole volume ---------------------------------------------------------------------------
    def _whole(self, x: torch.Tensor, b: torch.Tensor, target: Any, rules: Rules, first: bool) -> torch.Tensor:
        model = self.ctx.score_model
        rules.mode = "record"
        try:
            if first:  # the reference pass also counts module calls for the notes
                DeepLiftPlan(self.ctx, self.method, notes_of(self.ctx), probe=lambda: model(b), split=False)
            else:
                with torch.no_grad():
                    model(b)
            rules.mode = "apply"
            with torch.enable_grad():
                xr = x.clone().requires_grad_(True)
                score = _select_targets(model(xr), target).sum()
                (g,) = torch.autograd.grad(score, xr)
        finally:
            rules.mode = "off"
        rules.expect_consumed()
        return g

    # -- sliding window -------------------------------------------------------------------------
    def _patchwise(self, x: torch.Tensor, rows: list[torch.Tensor], target: Any, rules: Rules) -> list[torch.Tensor]:
        model = self.ctx.score_model
        sw = model.runner
        grid = sw.grid(x.shape[2:], x.device)
        DeepLiftPlan(self.ctx, self.method, notes_of(self.ctx), probe=lambda: _one_patch(sw, grid, x), split=False)
        saved = (sw.plain_forward, sw.before_recompute)
        sw.plain_forward = True  # the rules act only in the backward's recomputation
        weights = linear_weights(model.target) if isinstance(target, int) else None
        try:
            if weights is not None:
                return self._patchwise_linear(x, rows, target, rules, weights)
            grads, outputs = [], []
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)  # shares x's memory: no whole-volume copy
                score = _select_targets(model(xr), target).sum()
                for j, b in enumerate(rows):
                    reference = _ReferencePatches(sw, grid, b, rules)
                    sw.before_recompute = reference
                    try:
                        (g,) = torch.autograd.grad(score, xr, retain_graph=j < len(rows) - 1)
                    finally:
                        rules.mode = "off"
                    rules.expect_consumed()
                    grads.append(g)
                    outputs.append(reference.output())
            self._hand_over(sw, rows, outputs)
        finally:
            sw.plain_forward, sw.before_recompute = saved
        return grads

    def _patchwise_linear(self, x: torch.Tensor, rows: list[torch.Tensor], target: int, rules: Rules,
                          weights: Any) -> list[torch.Tensor]:
        """A linear target: each patch's upstream from the target's weights, ``F(x0)`` summed per patch."""
        model = self.ctx.score_model
        sw = model.runner
        grid = sw.grid(x.shape[2:], x.device)
        with torch.enable_grad():  # F(x): the prediction's stitched output, through the score model's hooks
            classes = model(x.detach().requires_grad_(True)).shape[1]
        grads, scores = [], []
        for b in rows:
            score = LinearScore(weights, grid, x.shape[0], classes)
            sw.before_recompute = _ReferencePatches(sw, grid, b, rules, score)
            try:
                grads.append(patchwise_backward(sw, grid, x, score.upstream(target)).to(x.dtype))
            finally:
                rules.mode = "off"
            rules.expect_consumed()
            scores.append(score.scores())
        for b, s in zip(rows, scores):
            with model.handing_over(b, s), torch.no_grad():
                model(b)
        return grads

    def _hand_over(self, sw: sliding.SlidingWindow, rows: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """Let the score model report ``F(x0)`` from the stitched reference outputs: no patch runs, also
        where the window cannot cache (a support, mixed precision), and the remembered prediction stays."""
        model = self.ctx.score_model
        for b, out in zip(rows, outputs):
            with sw.handing_over(b, out), torch.enable_grad():
                model(b.detach().requires_grad_(True))


def _one_patch(sw: sliding.SlidingWindow, grid: sliding.WindowGrid, x: torch.Tensor) -> None:
    """One network call on one patch: what the notes' module-call count needs."""
    active = sw.active_patches(grid) or [0]
    sw.run_patches(grid.pad_input(x[:1])[(slice(None), slice(None), *grid.slices[active[0]])])


class _ReferencePatches:
    """``before_recompute``: the baseline's patches of the coming batch, run without a graph while the
    rules keep their inputs; their outputs are stitched as the sliding window stitches, or, with a linear
    ``score``, only added to its scores."""

    def __init__(self, sw: sliding.SlidingWindow, grid: sliding.WindowGrid, b: torch.Tensor, rules: Rules,
                 score: LinearScore | None = None) -> None:
        self.sw, self.grid, self.rules, self.score = sw, grid, rules, score
        self.padded = grid.pad_input(b.detach())
        self.acc: torch.Tensor | None = None

    def __call__(self, chunk: list[tuple[int, int]], grid: sliding.WindowGrid) -> None:
        self.rules.expect_consumed()
        self.rules.mode = "record"
        try:
            ys = self.sw._run_chunk(torch.cat([self.padded[(slice(b, b + 1), slice(None), *grid.slices[p])]
                                               for b, p in chunk]), False)
        finally:
            self.rules.mode = "apply"
        if self.score is not None:
            for (b, p), y in zip(chunk, ys):
                self.score.add_patch(b, p, y)
            return
        if self.acc is None:
            self.acc = torch.zeros((self.padded.shape[0], ys.shape[1], *grid.padded), device=ys.device)
        for (b, p), y in zip(chunk, ys):
            self.acc[(b, slice(None), *grid.slices[p])] += y * grid.weight[0]

    def output(self) -> torch.Tensor:
        """The baseline's stitched output (every active patch ran)."""
        acc = self.acc if self.acc is not None else torch.zeros((self.padded.shape[0], 1, *self.grid.padded))
        self.acc = None
        return self.grid.crop(acc.div_(self.grid.count))  # in place: one whole-volume buffer, not two
