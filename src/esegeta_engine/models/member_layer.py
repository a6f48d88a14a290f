"""Layer methods on a layer inside a deployed pipeline's network: one copy of the layer per member.

A layer named inside nnU-Net's fold networks (``folds.0.encoder.stages.2``) or a bundle's
network runs once per **member** of the deployed function: for nnU-Net once per fold
``f``, mirrored copy ``m`` and patch ``p``; for a bundle's sliding window once per patch.
The deployed score is linear in the members' outputs,

``F(x) = S(R(mean_f sum_p w_p mean_m flip_m(y_fpm) / W))``   (nnU-Net)

with ``y_fpm`` the network on patch ``p`` of the mirrored copy ``m`` of the preprocessed
input, ``w_p`` the Gaussian, ``W`` the summed Gaussians and ``R`` the resampling back
and nonlinearity. The patch-wise backward (:mod:`.nnunet.window`; a bundle's
:mod:`esegeta_engine.forward.sliding`) recomputes one member at a time and
back-propagates that member's share of the upstream gradient, so each member's copy of
the layer has its activation ``A_k`` and ``G_k = dF/dA_k``. A mirrored copy's ``A`` and
``G`` are flipped back on the layer grid (the same axes as the output), each copy's layer
map ``m_k`` is taken with the method's per-copy rule (:mod:`esegeta_engine.methods.patch_layer_methods`)
and placed on the preprocessed (network) grid with :class:`~esegeta_engine.forward.patch_layer.LayerCanvas`,
a mirrored copy's moved onto the unmirrored copy's cells (a strided layer samples a flipped patch
``S - 1`` voxels further along: :mod:`.member_grid`; an inexact move is named in the map's notes):

``sum`` (additive attributions: layer gradient x activation)
    ``M(u) = sum_k up(m_k)(u)``; ``sum_k sum m_k`` is exactly the method's total over the
    deployed function (every copy is a separate unit of it), recorded as ``attribution_sum``.
``blend`` (CAMs)
    ``M(u) = sum_k w_p(k)(u) up(m_k)(u) / (n W(u))`` with ``n`` members per patch (mirrored
    copies x folds): the members' maps combined with the weights their outputs get. Each
    copy's CAM weights come from its own ``A_k``, ``G_k``: the activation that member
    computed and its gradient. One set of weights from a stitched layer would average
    activations computed with different context (and mirrored inputs) and is the gradient
    of nothing the pipeline ran.

The map on the network grid is then brought to the scan's grid as the probabilities are:
nnU-Net's probability resampling, the crop reverted (zero outside the non-zero box) and the
transposes undone; a bundle's inversion (``Invertd``). With one fold, no mirroring and one
patch, this is the plain network's layer method on the preprocessed input (tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.forward.patch_layer import LayerCanvas, LayerCopy
from esegeta_engine.models.member_grid import MirrorMove, Unknown, layer_places, mirror_move

PerCopy = Callable[[torch.Tensor, torch.Tensor, list[tuple[int, int]]], torch.Tensor]

MEMBER_METHODS = ("layer_gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam",
                  "layer_gradient_x_activation")
"""Layer methods built for layers inside a deployed pipeline's network (one backward, per-copy rule)."""

NNUNET_MEMBER_METHODS = (*MEMBER_METHODS, "layer_activation", "layer_integrated_gradients", "internal_influence")
"""Also built inside nnU-Net's fold networks: activation-only and layer-space paths (:mod:`.member_paths`)."""

_WHY = {
    "layer_conductance": "the input stays fixed (it sets nnU-Net's crop box, normalisation and resampling), so "
                         "the path runs in layer space, where the layer's own conductance is exactly its layer IG "
                         "(A(alpha') - A(alpha) = (alpha' - alpha) A)",
    "layer_deeplift": "DeepLIFT's rules need a reference pass of every member at a reference value of the layer; "
                      "an input reference would move nnU-Net's crop box and normalisation, and a layer-space "
                      "reference pass of the ensemble is not built",
    "layer_gradient_shap": "its baselines are drawn in input space (they move nnU-Net's crop box and "
                           "normalisation); a layer-space distribution of every member's copy is not built",
    "eigen_cam": "one principal component needs one feature space, but channel c of each fold is a different "
                 "learned feature; a per-fold component is not built",
    "score_cam": "each channel of the layer is a mask on every member's copy, and the deployed score is "
                 "nonlinear across members: one whole pipeline pass (patches x mirrored copies x folds network "
                 "calls) per channel, e.g. 32 channels x 64 calls = 2,048 network calls for one map",
}
_WHY["layer_deeplift_shap"] = _WHY["layer_deeplift"]
_WHY["eigen_grad_cam"] = _WHY["eigen_cam"]
_WHY["ablation_cam"] = _WHY["score_cam"].replace("is a mask on", "is zeroed in")


def method_refusal(method: str, layer: str, where: str,
                   built: tuple[str, ...] = MEMBER_METHODS) -> tuple[str, str] | None:
    """Why ``method`` does not run on ``layer`` inside a pipeline's network (None: it runs)."""
    if method in built:
        return None
    why = _WHY.get(method) if "nnU-Net" in where else None
    why = why or ("it edits or re-reads the layer outside the pipeline's patch-wise backward (path points move the "
                  "pipeline's preprocessing, references and stitched layers need a layer pass of their own)")
    return (f"method '{method}' on layer {layer!r} inside {where} is not built: {why}",
            f"use {', '.join(built)} on this layer, or any method on the layer 'network_input'")


TWO_PASS = ("deeplift", "deeplift_shap", "layer_deeplift", "layer_deeplift_shap")
"""Methods whose rules need a reference pass of the baseline beside the input's (DeepLIFT's rescale rules)."""


def two_pass_refusal(method: str, where: str, why: str) -> tuple[str, str] | None:
    """Why a DeepLIFT-family method cannot run through a deployed pipeline (None: not such a method)."""
    if method not in TWO_PASS:
        return None
    return (f"method '{method}' cannot run through {where}: DeepLIFT's rules compare each nonlinearity's input "
            f"with its value in a reference pass of the baseline, {why}",
            "use integrated_gradients (a path from the baseline through the whole pipeline; its completeness is "
            "reported against the pipeline's own F(x) - F(baseline)) or saliency / input_x_gradient; for "
            "DeepLIFT's rules explain one network on its own input (model: state dict + class)")


NNUNET_TWO_PASS = ("but the patch-wise backward recomputes every fold x mirrored copy x patch with the rules "
                   "already applying, so no member has a reference pass of its own; and a non-zero baseline "
                   "moves nnU-Net's crop box, normalisation and resampling, so the baseline's patches are not "
                   "the input's")


def find_in(networks: list[nn.Module], layer: nn.Module) -> str | None:
    """The name of ``layer`` inside one of ``networks`` (None: not inside any)."""
    for net in networks:
        for name, m in net.named_modules():
            if m is layer:
                return name
    return None


class _Copy(LayerCopy):
    """Forward hook keeping one call's activation (or input) and, after the backward, its gradient.

    ``scale``: the layer's value is replaced by ``scale * A`` (a layer-space path point, the input
    fixed); ``A`` is kept and ``G`` is the gradient at the replaced value. ``forward_only``: no graph,
    only ``A`` is kept.
    """

    scale: float | None = None
    forward_only = False

    def hooks(self, module: nn.Module) -> list[Any]:
        if self.layer_input:
            def pre(m: nn.Module, args: tuple) -> tuple | None:
                new = self.edit(args[0] if args else None)
                return None if new is None else (new, *args[1:])
            return [module.register_forward_pre_hook(pre)]
        return [module.register_forward_hook(lambda m, args, out: self.edit(out))]

    def edit(self, a: Any) -> torch.Tensor | None:
        """Keep ``a``; return its replacement (None: unchanged)."""
        if not isinstance(a, torch.Tensor):
            return None
        if self.forward_only:
            self.calls, self.a, self.g = self.calls + 1, a.detach(), None
            return None
        if self.scale is None:
            self.keep(a)
            return None
        new = a * self.scale
        self.keep(new)
        self.a = a.detach()
        return new

    def take(self, method: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.calls != 1 or self.a is None:
            raise MethodError(f"{method}: layer '{name}' ran {self.calls} times in one network call",
                              "pick a layer the network runs exactly once per forward pass (`esegeta layers MODEL`)")
        a, g = self.a, self.g if self.g is not None else torch.zeros_like(self.a)
        self.calls, self.a, self.g = 0, None, None
        return a, g


def scaled(modules: list[nn.Module], layer_input: bool, scale: float) -> list[Any]:
    """Hooks replacing every module's output (or first input) ``A`` by ``scale * A``."""
    if layer_input:
        return [m.register_forward_pre_hook(lambda m, args: (args[0] * scale, *args[1:]) if args else None)
                for m in modules]
    return [m.register_forward_hook(lambda m, args, out: out * scale) for m in modules]


class PlanGrid:
    """:class:`LayerCanvas`'s view of an nnU-Net window plan.

    A 2D configuration's patches are slices of the 3D preprocessed volume: they are placed
    as depth-1 patches (``roi = (1, *patch)``) at their slice.
    """

    def __init__(self, plan: Any) -> None:
        first = plan.slicers[0][1:]
        self.lead = sum(not isinstance(s, slice) for s in first)
        patch = tuple(s.stop - s.start for s in first if isinstance(s, slice))
        self.roi = (1,) * self.lead + patch
        self.slices = [tuple(slice(s, s + 1) if not isinstance(s, slice) else s for s in sl[1:])
                       for sl in plan.slicers]
        self.padded, self.spatial = tuple(plan.padded), tuple(plan.shape)
        self.offset = tuple(r.start or 0 for r in plan.revert)
        self.pad = [p - s for p, s in zip(self.padded, self.spatial)]
        g = plan.gaussian.float() if isinstance(plan.gaussian, torch.Tensor) else torch.ones(patch)
        self.weight = g.reshape((1, 1, *self.roi))


def fold_copies(pipe: Any, layer: nn.Module, method: str, name: str) -> list[nn.Module]:
    """``layer``'s module in every fold network of an nnU-Net pipeline (the same name in each)."""
    nets = list(pipe.ensemble.networks)
    rel = find_in(nets, layer)
    if rel is None:
        raise MethodError(f"{method}: layer '{name}' is not inside the pipeline's fold networks",
                          "pick a layer from `esegeta layers MODEL`")
    return [dict(net.named_modules())[rel] for net in nets]


class NnUNetLayerTap:
    """Told by the ensemble's backward of every member it recomputes (fold, patch, mirrored copy)."""

    def __init__(self, pipe: Any, layer: nn.Module, layer_input: bool, per_copy: PerCopy, combine: str,
                 method: str, name: str) -> None:
        ens = pipe.ensemble
        self.modules = fold_copies(pipe, layer, method, name)
        self.networks, self.pipe = list(ens.networks), pipe
        self.moves: dict[tuple, MirrorMove] = {}
        self.examples = {id(info["plan"]): i for i, info in enumerate(pipe._last)}
        self.copy, self.per_copy, self.combine = _Copy(layer_input), per_copy, combine
        self.method, self.name = method, name
        self.members = len(ens.networks) * len(ens.copy_axes)
        self.canvases: dict[int, LayerCanvas] = {}
        self.totals = torch.zeros(len(pipe._last), dtype=torch.float64)
        self.b = 0

    @contextlib.contextmanager
    def attached(self, plan: Any) -> Iterator[None]:
        """Hooks on the layer in every fold while one example's patches are recomputed."""
        self.b = self.examples[id(plan)]
        self.canvases.setdefault(self.b, LayerCanvas(PlanGrid(plan), 1, self.combine))  # type: ignore[arg-type]
        self.grid = self.canvases[self.b].grid
        handles = [h for m in self.modules for h in self.copy.hooks(m)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def member(self, fold: int, patch: int, axes: tuple[int, ...]) -> None:
        """One member's copy: flipped back, mapped by the method's rule, placed at its patch."""
        a, g = self.copy.take(self.method, self.name)
        if a.dim() != len(self.grid.roi) - self.grid.lead + 2:
            raise MethodError(f"method '{self.method}' needs a layer with a spatial grid, but layer '{self.name}' "
                              f"gives {tuple(a.shape)} per network call",
                              "choose a convolutional layer (or its activation) of the encoder or decoder")
        if axes:
            a, g = torch.flip(a, axes), torch.flip(g, axes)
        m = self.per_copy(a, g, [(self.b, patch)]).float()
        self.totals[self.b] += float(m.double().sum())
        for _ in range(self.grid.lead):
            m = m.unsqueeze(2)
        move = None
        if axes:  # the flipped-back copy's cells sit elsewhere on the patch than the unmirrored copy's
            d = self.mirror_move(tuple(a.shape[2:])).voxels
            move = (0,) * self.grid.lead + tuple(v if k + 2 in axes else 0 for k, v in enumerate(d))
        self.canvases[self.b].add([(0, patch)], m, move)

    def mirror_move(self, cells: tuple[int, ...]) -> MirrorMove:
        """The layer's mirror move on this plan's patch (:mod:`.member_grid`), derived once; an inexact
        one is named in the pipeline's ``layer_notes``."""
        patch = self.grid.roi[self.grid.lead:]
        key = (patch, cells)
        if key not in self.moves:
            try:
                places = layer_places(self.networks[0], self.modules[0], self.copy.layer_input, len(cells), patch)
            except Unknown as why:
                places, reason = set(), str(why)
            else:
                reason = ""
            move = mirror_move(places, patch, cells, self.name, reason)
            self.moves[key] = move
            if move.inexact:
                note = f"{self.method}: {move.inexact}"
                notes = self.pipe.__dict__.setdefault("layer_notes", [])
                if note not in notes:
                    notes.append(note)
        return self.moves[key]

    def result(self, b: int) -> torch.Tensor | None:
        """Example ``b``'s map on the preprocessed grid ``(C', *grid)`` (None: no member was recomputed)."""
        canvas = self.canvases.get(b)
        if canvas is None:
            return None
        out = canvas.result(torch.device("cpu"))[0]
        return out / self.members if self.combine == "blend" else out


def nnunet_layer_map(pipe: Any, score_model: nn.Module, layer: nn.Module, inputs: torch.Tensor, target: int,
                     layer_input: bool, per_copy: PerCopy, combine: str, method: str,
                     name: str, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer method over every member of an nnU-Net pipeline (module docstring), on the scan's grid.

    ``scale``: the whole pipeline (forward and backward) runs with every member's copy of the layer
    replaced by ``scale * A`` (a layer-space path point); ``per_copy`` gets the unscaled ``A`` and
    the gradient at the path point. Returns the map ``(N, C', *scan)`` and, per example, the sum of
    every copy's layer map.
    """
    if combine not in ("sum", "blend"):
        raise MethodError(f"method '{method}' is not built on layers inside nnU-Net's fold networks",
                          f"use {', '.join(MEMBER_METHODS)}")
    x = inputs.detach().requires_grad_(True)
    ens = pipe.ensemble
    with torch.enable_grad():
        handles = [] if scale is None else scaled(fold_copies(pipe, layer, method, name), layer_input, scale)
        try:  # the forward at the path point: hooked, so it runs (never the prediction's reused logits)
            scores = score_model(x)[:, target]
        finally:
            for h in handles:
                h.remove()
        tap = NnUNetLayerTap(pipe, layer, layer_input, per_copy, combine, method, name)
        tap.copy.scale = scale
        ens.tap = tap
        try:
            torch.autograd.grad(scores.sum(), x)
        finally:
            ens.tap = None
    return scan_maps(pipe, tap, inputs), tap.totals


def scan_maps(pipe: Any, tap: NnUNetLayerTap, inputs: torch.Tensor) -> torch.Tensor:
    """Every example's map from ``tap``, brought to the scan's grid as the probabilities are."""
    maps = []
    for b in range(inputs.shape[0]):
        m = tap.result(b)
        info = pipe._last[b]
        if m is None:  # the target reads no voxel of this example
            m = torch.zeros((1, *info["plan"].shape))
        maps.append(pipe._to_scan(m, info, logits=False))
    return torch.stack(maps).to(inputs.device)
