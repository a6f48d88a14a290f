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
from esegeta_engine.methods._layer_tap import CAM_LAYER_PARAMS, RELU_PARAM, activations, tap, weighted_map
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
        with torch.no_grad():
            # the input and its baseline in one evaluation: [x0..xN-1, b0..bN-1]
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
            a, scores = activations(ctx, x, layer_input, "ablation_cam")
            y = scores[:, target]
            index = select_channels(a, p["max_channels"])
            k, bs = index.shape[1], p["batch_size"]
            budget = TimeBudget(getattr(ctx.score_model, "monitor", None), "ablation_cam", k, bs,
                                "max_channels", "channels")
            ablated = torch.empty(n, k, dtype=y.dtype, device=y.device)
            for batch, start in enumerate(range(0, k, bs)):
                idx = index[:, start:start + bs]  # (N, b)
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


def _channel_cost(method: str):  # noqa: ANN202 - a CostFn
    def cost(info: CostInfo, params: Mapping[str, Any]) -> int:
        return 1 + n_batches(channel_count(info, params, method), int(params["batch_size"]))

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
    patchwise="whole", cost=_channel_cost("score_cam")))

register(MethodSpec(
    name="ablation_cam", family="layer", output_grid="layer", title="Ablation-CAM",
    summary="activations weighted by the relative score drop when their channel is set to zero; "
            "one batched evaluation per batch_size channels",
    params=(MAX_CHANNELS, BATCH_SIZE, RELU_PARAM, *CAM_LAYER_PARAMS),
    build=lambda ctx, p: Call(AblationCam(ctx, p)), needs_layer=True, needs_hooks=True,
    reference="Desai & Ramaswamy 2020, Ablation-CAM: Visual Explanations for Deep Convolutional "
              "Network via Gradient-free Localization, WACV",
    patchwise="whole", cost=_channel_cost("ablation_cam")))
