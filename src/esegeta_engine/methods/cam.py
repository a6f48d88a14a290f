"""Gradient-weighted CAMs and Eigen-CAM on any layer with a spatial grid (2D and 3D).

Each method reads the activation ``A`` (N, C, *grid) of the chosen layer and,
for the gradient-based ones, the gradient ``G`` of the target score with
respect to it, in one model evaluation; it returns the layer-grid map
``(N, 1, *grid)``, which :func:`esegeta_engine.methods.run.attribute`
interpolates to the input grid like every layer method.

Notation: ``g = G[k, i]`` and ``a = A[k, i]`` at channel ``k``, voxel ``i``;
sums over ``i`` run over the layer's grid.

- Grad-CAM++ (Chattopadhyay et al. 2018): ``w_k = sum_i alpha_ki relu(g_ki)`` with
  ``alpha_ki = g_ki^2 / (2 g_ki^2 + (sum_j a_kj) g_ki^3)``. The paper (and MONAI)
  explain ``exp(score)``, which multiplies every weight by ``exp(score)``: that
  overflows for scores summed over a region and only rescales the map, so it is
  left out (the map is MONAI's divided by ``exp(score)``).
- XGrad-CAM (Fu et al. 2020): ``w_k = sum_i g_ki a_ki / sum_i a_ki``.
- LayerCAM (Jiang et al. 2021): ``map_i = sum_k relu(g_ki) a_ki``.
- HiResCAM (Draelos & Carin 2020): ``map_i = sum_k g_ki a_ki``.
- Eigen-CAM (Muhammad & Yeasin 2020): the projection of the voxels' channel
  vectors (centred) on their first principal component; no gradient and no
  target. Eigen-Grad-CAM applies the same to ``G * A``, which makes it
  class-specific (for segmentation targets, where the activations alone show
  every structure). The sign of a principal component is arbitrary; it is
  fixed so that the map correlates positively with the channel sum of the
  analysed tensor.

Under sliding-window execution the gradient CAMs run on every patch copy of the layer
(:mod:`.patch_layer_methods`); Eigen-CAMs take the component of the stitched layer, built
patch by patch (:func:`~.patch_layer_methods.stitched_layer`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from esegeta_engine.methods._layer_tap import (
    CAM_LAYER_PARAMS,
    RELU_PARAM,
    activations,
    activations_and_gradients,
    spatial_sum,
    weighted_map,
)
from esegeta_engine.methods.patch_layer_methods import STITCHED_LAYER, PatchwiseCam, is_patchwise, stitched_layer
from esegeta_engine.methods.registry import Call, CostInfo, MethodContext, MethodSpec, register

Weigh = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gradcam_pp_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel weights ``(N, C, 1, ...)`` without the ``exp(score)`` factor."""
    g2 = g * g
    denominator = 2 * g2 + spatial_sum(a) * g2 * g
    alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
    return spatial_sum(alpha * g.clamp(min=0))


def xgradcam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM channel weights: activation-weighted gradient sums (0 for all-zero channels)."""
    total = spatial_sum(a)
    return torch.where(total != 0, spatial_sum(g * a) / torch.where(total != 0, total, 1.0), 0.0)


def layercam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LayerCAM voxel-wise weights ``relu(G)``."""
    return g.clamp(min=0)


def hirescam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HiResCAM voxel-wise weights: the gradient itself."""
    return g


def first_component(t: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Projection of each voxel's channel vector on the first principal component.

    ``t`` is ``(N, C, *grid)``; returns ``(N, 1, *grid)``. The vectors are
    centred over the grid; the sign makes the projection correlate positively
    with the (centred) channel sum, and is ``+`` when that correlation is 0.
    The component is the top eigenvector of the ``C x C`` scatter matrix, summed
    in float64 over ``chunk`` voxels at a time, so a whole scan's layer needs no
    ``voxels x C`` copy (the first right-singular vector of the centred data).
    """
    n, c, *grid = t.shape
    flat = t.reshape(n, c, -1)
    out = torch.empty((n, 1, flat.shape[2]), dtype=t.dtype, device=t.device)
    for i in range(n):
        x = flat[i]
        mean = x.double().mean(dim=1, keepdim=True)
        scatter = torch.zeros((c, c), dtype=torch.float64, device=t.device)
        for s in range(0, x.shape[1], chunk):
            xc = x[:, s:s + chunk].double() - mean
            scatter += xc @ xc.T
        v = torch.linalg.eigh(scatter)[1][:, -1]
        # sum over voxels of projection x channel sum = v' S 1: its sign fixes the component's
        sign = -1.0 if float(v @ scatter.sum(dim=1)) < 0 else 1.0
        for s in range(0, x.shape[1], chunk):
            out[i, 0, s:s + chunk] = (sign * (v @ (x[:, s:s + chunk].double() - mean))).to(t.dtype)
    return out.reshape(n, 1, *grid)


class GradientCam:
    """A CAM from one activation/gradient pair: ``sum_k weigh(A, G)_k A_k`` (Captum's shape).

    Parameters
    ----------
    ctx : MethodContext
        Score model, layer and inputs.
    name : str
        Method name for messages.
    weigh : callable
        ``weigh(A, G)`` -> weights broadcastable to ``A``.
    relu : bool
        ReLU of the summed map.
    layer_input : bool
        Use the layer's input instead of its output.
    """

    def __init__(self, ctx: MethodContext, name: str, weigh: Weigh, relu: bool, layer_input: bool) -> None:
        self.ctx, self.name, self.weigh, self.relu, self.layer_input = ctx, name, weigh, relu, layer_input

    def attribute(self, inputs: torch.Tensor, target: int = 0) -> torch.Tensor:
        """Return the layer-grid map ``(N, 1, *grid)`` of class ``target``."""
        a, g, _ = activations_and_gradients(self.ctx, inputs, target, self.layer_input, self.name)
        return weighted_map(self.weigh(a, g), a, self.relu)


class EigenCam:
    """First principal component of the activations (or of gradient x activation)."""

    def __init__(self, ctx: MethodContext, name: str, layer_input: bool, with_gradient: bool) -> None:
        self.ctx, self.name, self.layer_input, self.with_gradient = ctx, name, layer_input, with_gradient

    def attribute(self, inputs: torch.Tensor, target: int = 0) -> torch.Tensor:
        """Return the layer-grid map ``(N, 1, *grid)``."""
        if is_patchwise(self.ctx):
            return first_component(stitched_layer(self.ctx, inputs, target, self.layer_input, self.with_gradient,
                                                  self.name))
        if self.with_gradient:
            a, g, _ = activations_and_gradients(self.ctx, inputs, target, self.layer_input, self.name)
            return first_component(g * a)
        a, _ = activations(self.ctx, inputs.detach(), self.layer_input, self.name)
        return first_component(a)


def one_evaluation(info: CostInfo, params: Mapping[str, Any]) -> int:
    """Cost of methods that evaluate the model once (with or without a backward pass)."""
    return 1


def _register(name: str, title: str, summary: str, weigh: Weigh, reference: str) -> None:
    def build(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
        cam = PatchwiseCam if is_patchwise(ctx) else GradientCam
        return Call(cam(ctx, name, weigh, p["relu_attributions"], p["attribute_to_layer_input"]))

    register(MethodSpec(name=name, family="layer", output_grid="layer", title=title, summary=summary,
                        params=(RELU_PARAM, *CAM_LAYER_PARAMS), build=build, needs_layer=True,
                        needs_hooks=True, reference=reference, patchwise="gradient", cost=one_evaluation))


_register("gradcam_pp", "Grad-CAM++",
          "activations weighted by positive gradients with per-voxel coefficients from higher-order "
          "terms (finite form, safe for region-sum scores)", gradcam_pp_weights,
          "Chattopadhyay et al. 2018, Grad-CAM++: Generalized Gradient-Based Visual Explanations for "
          "Deep Convolutional Networks, WACV, arXiv:1710.11063")
_register("xgradcam", "XGrad-CAM",
          "activations weighted by their activation-normalised gradient sums", xgradcam_weights,
          "Fu et al. 2020, Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of "
          "CNNs, BMVC, arXiv:2008.02312")
_register("layercam", "LayerCAM",
          "activations weighted voxel by voxel by their positive gradients", layercam_weights,
          "Jiang et al. 2021, LayerCAM: Exploring Hierarchical Class Activation Maps for "
          "Localization, IEEE TIP 30:5875-5888")
_register("hirescam", "HiResCAM",
          "gradient x activation summed over channels (faithful to the score for the layer)",
          hirescam_weights,
          "Draelos & Carin 2020, Use HiResCAM instead of Grad-CAM for faithful explanations of "
          "convolutional neural networks, arXiv:2011.08891")


def _eigen(with_gradient: bool) -> Callable[[MethodContext, Mapping[str, Any]], Call]:
    def build(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
        name = "eigen_grad_cam" if with_gradient else "eigen_cam"
        return Call(EigenCam(ctx, name, p["attribute_to_layer_input"], with_gradient),
                    passes_target=with_gradient)

    return build


_EIGEN_REF = ("Muhammad & Yeasin 2020, Eigen-CAM: Class Activation Map using Principal Components, "
              "IJCNN, arXiv:2008.00299")
register(MethodSpec(
    name="eigen_cam", family="layer", output_grid="layer", title="Eigen-CAM",
    summary="first principal component of the layer's activations (class-agnostic, no gradient)",
    params=CAM_LAYER_PARAMS, build=_eigen(False), needs_layer=True, needs_hooks=True,
    reference=_EIGEN_REF, patchwise=STITCHED_LAYER, cost=one_evaluation))
register(MethodSpec(
    name="eigen_grad_cam", family="layer", output_grid="layer", title="Eigen-Grad-CAM",
    summary="first principal component of gradient x activation: class-specific Eigen-CAM for "
            "segmentation targets",
    params=CAM_LAYER_PARAMS, build=_eigen(True), needs_layer=True, needs_hooks=True,
    reference=_EIGEN_REF + " (applied to gradient x activation)", patchwise=STITCHED_LAYER,
    cost=one_evaluation))
