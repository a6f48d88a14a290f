"""Score-CAM and Ablation-CAM: channel weights from batched model evaluations (2D and 3D).

Both read the layer's activation ``A`` (N, C, *grid) in one evaluation, then
evaluate one perturbed copy of each input per channel, ``batch_size`` channels
per model evaluation. ``max_channels`` keeps only the channels whose
activation varies most over the grid (per input); the others get weight 0.

- Score-CAM (Wang et al. 2020): channel ``k``'s activation, min-max normalised
  on the layer grid and interpolated to the input grid, is a mask ``M_k``; the
  weight is the score of ``x M_k + b (1 - M_k)`` minus the score of the
  baseline ``b`` (the paper's increase of confidence), or, with
  ``weighting: softmax``, the softmax of those scores over the channels (as
  torchcam computes it). Map: ``relu(sum_k w_k A_k)``.
- Ablation-CAM (Desai & Ramaswamy 2020): channel ``k`` of the activation is set
  to zero; ``w_k = (y - y_k) / |y|`` with ``y`` the unablated score (the paper
  divides by ``y``, a positive class score; ``|y|`` keeps the sign of the
  evidence for negative scores). Map: ``relu(sum_k w_k A_k)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from esegeta_engine.errors import MethodError
from esegeta_engine.methods._batches import (
    BATCH_SIZE,
    TimeBudget,
    n_batches,
    stack_input_major,
    unstack_scores,
)
from esegeta_engine.methods._common import BASELINE_PARAM, make_baseline
from esegeta_engine.methods._layer_tap import (
    CAM_LAYER_PARAMS,
    RELU_PARAM,
    activations,
    check_grid,
    tap,
    weighted_map,
)
from esegeta_engine.methods.patch_layer_methods import STITCHED_LAYER, is_patchwise, stitched_layer
from esegeta_engine.methods.registry import Call, CostInfo, MethodContext, MethodSpec, Param, register

MAX_CHANNELS = Param("max_channels", "int", 0,
                     "evaluate only this many channels, those whose activation varies most (0: all)",
                     minimum=0, maximum=1_000_000)


def select_channels(a: torch.Tensor, cap: int) -> torch.Tensor:
    """Indices ``(N, k)`` of the ``k = min(cap, C)`` channels of largest spatial variance (all if 0)."""
    n, c = a.shape[:2]
    if cap == 0 or cap >= c:
        return torch.arange(c, device=a.device).expand(n, c)
    variance = a.flatten(2).var(dim=-1, unbiased=False)
    return variance.topk(cap, dim=1).indices


def channel_count(info: CostInfo, params: Mapping[str, Any], method: str) -> int:
    """Channels a channel-wise CAM evaluates, from ``info.layer_channels`` and ``max_channels``."""
    cap = int(params.get("max_channels", 0))
    if info.layer_channels is None:  # a cap above the layer's channels would over-count: unknown
        raise MethodError(f"the cost of '{method}' depends on the layer's channels, which are unknown",
                          "fill CostInfo.layer_channels")
    return min(cap, info.layer_channels) if cap else info.layer_channels


def _scatter(weights: torch.Tensor, index: torch.Tensor, channels: int) -> torch.Tensor:
    """Weights ``(N, k)`` of channels ``index`` -> ``(N, C)`` with zeros elsewhere."""
    full = weights.new_zeros(weights.shape[0], channels)
    return full.scatter(1, index, weights)


def _check_saturation(weights: torch.Tensor, raised: torch.Tensor) -> None:
    """Refuse a softmax weighting that puts (almost) all weight on one channel.

    torchcam's softmax is taken over a classifier's logits (differences of a few units). Over
    region-sum scores of a segmentation the masked scores differ by hundreds between channels,
    so the softmax is one-hot: the map is the activation of whichever channel's mask keeps most
    of the image, the same for every class (found on MONAI's UNETR at its output block).
    """
    if weights.shape[1] > 1 and float(weights.amax()) > 0.999:
        spread = float((raised.amax(dim=1) - raised.amin(dim=1)).max())
        raise MethodError(
            f"score_cam with weighting 'softmax' is saturated: the masked scores differ by up to {spread:.3g} "
            f"between channels, so one channel gets {float(weights.amax()):.4f} of the weight and the map is "
            "that channel's activation whatever the explained class",
            "use weighting: increase (the paper's score increase over the baseline), or a target with a "
            "per-voxel score scale (e.g. a voxel target)")


def _expand(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return w.reshape(*w.shape, *([1] * (a.dim() - 2)))


class ScoreCam:
    """Score-CAM with batched masked evaluations (Captum's ``attribute`` shape)."""

    def __init__(self, ctx: MethodContext, params: Mapping[str, Any]) -> None:
        self.ctx, self.p = ctx, params

    def attribute(self, inputs: torch.Tensor, target: int = 0) -> torch.Tensor:
        """Return the layer-grid map ``(N, 1, *grid)`` of class ``target``."""
        ctx, p = self.ctx, self.p
        x = inputs.detach()
        n = x.shape[0]
        base = make_baseline(x, p["baseline"])
        runner = ctx.score_model.runner if is_patchwise(ctx) else None
        try:
            return self._attribute(x, base, target, runner)
        finally:
            if runner is not None:
                runner.set_base(None)

    def _attribute(self, x: torch.Tensor, base: torch.Tensor, target: int, runner: Any) -> torch.Tensor:
        ctx, p = self.ctx, self.p
        n = x.shape[0]
        with torch.no_grad():
            if runner is not None:
                # the stitched layer, then the baseline's patch outputs, which the masked copies reuse
                # wherever they equal the baseline (a channel that is zero there masks the input out)
                a = stitched_layer(ctx, x, target, p["attribute_to_layer_input"], False, "score_cam")
                runner.set_base(base)
                scores = ctx.score_model(base)
                base_score = scores[:, target]
            else:  # the input and its baseline in one evaluation: [x0..xN-1, b0..bN-1]
                a, scores = activations(ctx, torch.cat([x, base]), p["attribute_to_layer_input"], "score_cam")
                a, base_score = a[:n], scores[n:, target]
            index = select_channels(a, p["max_channels"])
            lo = a.flatten(2).amin(-1)
            span = a.flatten(2).amax(-1) - lo
            k = index.shape[1]
            bs = p["batch_size"]
            budget = TimeBudget(getattr(ctx.score_model, "monitor", None), "score_cam", k, bs,
                                "max_channels", "channels")
            raised = torch.empty(n, k, dtype=scores.dtype, device=scores.device)
            mode = "bilinear" if ctx.spatial_dims == 2 else "trilinear"
            for batch, start in enumerate(range(0, k, bs)):
                idx = index[:, start:start + bs]  # (N, b)
                gather = idx.reshape(*idx.shape, *([1] * ctx.spatial_dims)).expand(-1, -1, *a.shape[2:])
                chosen = a.gather(1, gather)
                norm = (chosen - _expand(lo.gather(1, idx), a)) / (_expand(span.gather(1, idx), a) + 1e-8)
                masks = F.interpolate(norm.reshape(-1, 1, *a.shape[2:]), size=x.shape[2:], mode=mode,
                                      align_corners=False).reshape(n, idx.shape[1], 1, *x.shape[2:])
                copies = x.unsqueeze(1) * masks + base.unsqueeze(1) * (1 - masks)  # (N, b, C, *s)
                out = ctx.score_model(stack_input_major(copies.transpose(0, 1)))[:, target]
                raised[:, start:start + idx.shape[1]] = unstack_scores(out, n)
                if batch == 0:
                    budget.after_first_batch()
            if p["weighting"] == "softmax":
                weights = raised.softmax(dim=1)
                _check_saturation(weights, raised)
            else:
                weights = raised - base_score.unsqueeze(1)
            full = _scatter(weights.to(a.dtype), index, a.shape[1])
        return weighted_map(_expand(full, a), a, p["relu_attributions"])


class AblationCam:
    """Ablation-CAM with batched channel ablations (Captum's ``attribute`` shape)."""

    def __init__(self, ctx: MethodContext, params: Mapping[str, Any]) -> None:
        self.ctx, self.p = ctx, params

    def attribute(self, inputs: torch.Tensor, target: int = 0) -> torch.Tensor:
        """Return the layer-grid map ``(N, 1, *grid)`` of class ``target``."""
        ctx, p = self.ctx, self.p
        x = inputs.detach()
        n = x.shape[0]
        layer_input = p["attribute_to_layer_input"]
        with torch.no_grad():
            windowed = PatchwiseAblation(ctx, x, layer_input) if is_patchwise(ctx) else None
            if windowed is not None:
                a, scores = windowed.a, windowed.scores(windowed.base_outputs)
            else:
                a, scores = activations(ctx, x, layer_input, "ablation_cam")
            y = scores[:, target]
            index = select_channels(a, p["max_channels"])
            k, bs = index.shape[1], p["batch_size"]
            budget = TimeBudget(getattr(ctx.score_model, "monitor", None), "ablation_cam", k, bs,
                                "max_channels", "channels")
            ablated = torch.empty(n, k, dtype=y.dtype, device=y.device)
            for batch, start in enumerate(range(0, k, bs)):
                idx = index[:, start:start + bs]  # (N, b)
                if windowed is not None:
                    ablated[:, start:start + idx.shape[1]] = windowed.ablated_scores(idx, target)
                    if batch == 0:
                        budget.after_first_batch()
                    continue
                b = idx.shape[1]
                keep = torch.ones(b, n, a.shape[1], dtype=a.dtype, device=a.device)
                keep.scatter_(2, idx.T.unsqueeze(-1), 0.0)
                keep = keep.reshape(b * n, a.shape[1], *([1] * ctx.spatial_dims))

                def ablate(act: torch.Tensor, keep: torch.Tensor = keep) -> torch.Tensor:
                    return act * keep.to(act.dtype)

                assert ctx.layer is not None
                with tap(ctx.layer, layer_input, ablate):
                    out = ctx.score_model(x.repeat(b, *([1] * (x.dim() - 1))))[:, target]
                ablated[:, start:start + b] = unstack_scores(out, n)
                if batch == 0:
                    budget.after_first_batch()
            scale = y.abs().clamp(min=torch.finfo(y.dtype).tiny).unsqueeze(1)
            weights = (y.unsqueeze(1) - ablated) / scale
            full = _scatter(weights.to(a.dtype), index, a.shape[1])
        return weighted_map(_expand(full, a), a, p["relu_attributions"])


class PatchwiseAblation:
    """Ablation-CAM's evaluations under a sliding window, reusing unchanged patches.

    One pass over every patch keeps each patch's output and which of its layer channels are
    non-zero, and builds the stitched layer (activations blended, as for Eigen-CAM). Zeroing
    channel ``k`` of the stitched layer zeroes it in every copy; a copy whose channel ``k`` is
    already zero is unchanged, so only the patches where it is non-zero are recomputed, and the
    ablated output is restitched from their new outputs and the others' kept ones.
    """

    def __init__(self, ctx: MethodContext, x: torch.Tensor, layer_input: bool) -> None:
        from esegeta_engine.forward.patch_layer import LayerCanvas

        self.ctx, self.layer_input, self.n = ctx, layer_input, x.shape[0]
        self.sw = ctx.score_model.runner
        self.grid = self.sw.grid(x.shape[2:], x.device)
        self.count = self.grid.count  # built once for every batch's stitch (the grid does not keep it)
        self.xp = self.grid.pad_input(x)
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.nonzero: dict[tuple[int, int], torch.Tensor] = {}
        canvas = LayerCanvas(self.grid, self.n, "blend", on_layer_grid=True)
        seen: list[torch.Tensor] = []
        assert ctx.layer is not None
        with tap(ctx.layer, layer_input, lambda a: seen.append(a) or a):
            for chunk in self.sw.chunks(self.n, self.grid):
                seen.clear()
                ys = self.sw.run_patches(self._patches(chunk))
                if len(seen) != 1:
                    raise MethodError(f"ablation_cam: layer '{ctx.layer_name}' ran {len(seen)} times for one "
                                      "patch batch", "pick a layer the network runs once (`esegeta layers MODEL`)")
                a = check_grid(seen[0], ctx, "ablation_cam")
                canvas.add(chunk, a.float())
                for item, y, ai in zip(chunk, ys, a):
                    self.outputs[item] = y
                    self.nonzero[item] = ai.flatten(1).ne(0).any(dim=1)
        self.a = canvas.result(x.device)
        self.base_outputs = self._stitch({})
        self.monitor = getattr(ctx.score_model, "monitor", None)
        if self.monitor is not None:  # counted as the cost function counts: one pass, then one per batch
            self.monitor.evaluated(self.n)

    def _patches(self, items: list[tuple[int, int]]) -> torch.Tensor:
        return torch.cat([self.xp[(slice(b, b + 1), slice(None), *self.grid.slices[p])] for b, p in items])

    def _stitch(self, fresh: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        """The stitched output of every example, patch outputs from ``fresh`` where given."""
        g = self.grid
        k = next(iter(self.outputs.values())).shape[0]
        num = torch.zeros((self.n, k, *g.padded), device=self.xp.device)
        for (b, p), y in self.outputs.items():
            num[(b, slice(None), *g.slices[p])] += fresh.get((b, p), y) * g.weight[0]
        return g.crop(num / self.count)

    def scores(self, out: torch.Tensor) -> torch.Tensor:
        return self.ctx.score_model.target(out)

    def ablated_scores(self, idx: torch.Tensor, target: int) -> torch.Tensor:
        """Scores ``(N, b)`` with channel ``idx[i, j]`` of example ``i`` zeroed, for each ``j``."""
        cols = []
        bs = self.sw.settings.sw_batch_size
        if self.monitor is not None:
            self.monitor.evaluated(self.n * idx.shape[1])
        for j in range(idx.shape[1]):
            todo = [(b, p) for (b, p), nz in self.nonzero.items() if bool(nz[int(idx[b, j])])]
            fresh: dict[tuple[int, int], torch.Tensor] = {}
            for i in range(0, len(todo), bs):
                chunk = todo[i:i + bs]
                channels = torch.tensor([int(idx[b, j]) for b, _ in chunk], device=self.xp.device)

                def ablate(a: torch.Tensor, channels: torch.Tensor = channels) -> torch.Tensor:
                    keep = torch.ones(a.shape[:2], dtype=a.dtype, device=a.device)
                    keep[torch.arange(a.shape[0]), channels] = 0
                    return a * keep.reshape(*keep.shape, *([1] * (a.dim() - 2)))

                assert self.ctx.layer is not None
                with tap(self.ctx.layer, self.layer_input, ablate):
                    fresh.update(zip(chunk, self.sw.run_patches(self._patches(chunk))))
            cols.append(self.scores(self._stitch(fresh))[:, target])
        return torch.stack(cols, dim=1)


def _channel_cost(method: str):  # noqa: ANN202 - a CostFn
    def cost(info: CostInfo, params: Mapping[str, Any]) -> int:
        stitched = int(info.patchwise and method == "score_cam")  # the stitched layer, then the baseline
        return 1 + stitched + n_batches(channel_count(info, params, method), int(params["batch_size"]))

    cost.__doc__ = f"One evaluation for the activations, then one per batch of channels ({method})."
    return cost


register(MethodSpec(
    name="score_cam", family="layer", output_grid="layer", title="Score-CAM",
    summary="activations weighted by the score of the input masked by each (upsampled, normalised) "
            "channel; one batched evaluation per batch_size channels",
    params=(Param("weighting", "str", "increase",
                  "channel weight: score increase over the baseline (paper) or its softmax over "
                  "channels (torchcam)", choices=("increase", "softmax")),
            BASELINE_PARAM, MAX_CHANNELS, BATCH_SIZE, RELU_PARAM, *CAM_LAYER_PARAMS),
    build=lambda ctx, p: Call(ScoreCam(ctx, p)), needs_layer=True, needs_hooks=True,
    reference="Wang et al. 2020, Score-CAM: Score-Weighted Visual Explanations for Convolutional "
              "Neural Networks, CVPR workshops, arXiv:1910.01279",
    patchwise=STITCHED_LAYER, cost=_channel_cost("score_cam")))

register(MethodSpec(
    name="ablation_cam", family="layer", output_grid="layer", title="Ablation-CAM",
    summary="activations weighted by the relative score drop when their channel is set to zero; "
            "one batched evaluation per batch_size channels",
    params=(MAX_CHANNELS, BATCH_SIZE, RELU_PARAM, *CAM_LAYER_PARAMS),
    build=lambda ctx, p: Call(AblationCam(ctx, p)), needs_layer=True, needs_hooks=True,
    reference="Desai & Ramaswamy 2020, Ablation-CAM: Visual Explanations for Deep Convolutional "
              "Network via Gradient-free Localization, WACV",
    patchwise=STITCHED_LAYER, cost=_channel_cost("ablation_cam")))
