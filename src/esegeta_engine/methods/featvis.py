"""Feature visualisation: volumes that show what a layer responds to (2D and 3D).

These methods return volumes on the input grid ``(N, C, *spatial)`` (``layer_visualisation``:
``(N, k * C, *spatial)``, one volume per channel, channel-major) rather than attribution maps:
activation maximisation of one channel or unit, a visualisation of every channel of a layer, DeepDream on the input, and the inversion of a layer's representation. They optimise
an input through :mod:`esegeta_engine.methods._featvis`, one counted model evaluation per step,
and explain no class (the target is not used), so each runs once per layer.

Under sliding-window execution the network only ever sees one patch, so its field of view is the
patch: an input of the patch size is optimised (deep dream and the inversion start from / match the
input's central patch), placed at the centre of the volume with zeros around it, and the map's notes
say so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from esegeta_engine.methods._featvis import (
    Settings,
    check_channel,
    layer_activation,
    optimise,
)
from esegeta_engine.methods.behaviour import PatchwiseMode, register_patchwise_mode
from esegeta_engine.methods.notes import add_note, notes_of
from esegeta_engine.methods.registry import (
    Call,
    CostInfo,
    MethodContext,
    MethodSpec,
    Param,
    register,
)

STEPS = Param("steps", "int", 64, "optimisation steps (one model evaluation each)",
              minimum=1, maximum=100000)
OPTIMISATION = (
    Param("lr", "float", 0.05, "Adam learning rate", minimum=1e-8, maximum=100.0),
    Param("parameterisation", "str", "fourier",
          "optimise a decorrelated spectrum (fourier: smooth structure) or the voxels (pixel)",
          choices=("fourier", "pixel")),
    Param("decay", "float", 1.0, "fourier: spectrum scaled by 1/|frequency|**decay",
          minimum=0.0, maximum=4.0),
    Param("jitter", "int", 1, "random shift in voxels per axis before each step (0: none)",
          minimum=0, maximum=256),
    Param("tv_weight", "float", 0.0, "weight of the total-variation penalty (smoothness)",
          minimum=0.0, maximum=1e6),
    Param("l2_weight", "float", 0.01, "weight of the L2 penalty on the volume (keeps it bounded)",
          minimum=0.0, maximum=1e6),
)
INIT_STD = Param("init_std", "float", 0.1, "standard deviation of the seeded noise the volume "
                 "starts from", minimum=0.0, maximum=100.0)
CHANNEL = Param("channel", "int", 0, "channel (filter) of the layer to maximise", minimum=0,
                maximum=1_000_000)


_FROM_INPUT = ("deep_dream", "inverted_representation")


def _settings(p: Mapping[str, Any]) -> Settings:
    return Settings(steps=p["steps"], lr=p["lr"], parameterisation=p["parameterisation"],
                    decay=p["decay"], jitter=p["jitter"], tv_weight=p["tv_weight"],
                    l2_weight=p["l2_weight"])


def _noise(shape: tuple[int, ...], std: float, like: torch.Tensor,
           generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * std).to(device=like.device, dtype=like.dtype)


def _spatial_mean(a: torch.Tensor) -> torch.Tensor:
    """``(B, *grid)`` -> ``(B,)``; a linear layer's ``(B,)`` stays as it is."""
    return a.reshape(a.shape[0], -1).mean(dim=1)


class _Optimised:
    """Captum-shaped wrapper: ``attribute(inputs)`` runs one feature-visualisation optimisation."""

    def __init__(self, ctx: MethodContext, params: Mapping[str, Any], kind: str) -> None:
        self.ctx, self.params, self.kind = ctx, params, kind

    def attribute(self, inputs: torch.Tensor, **_: Any) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.ctx.seed)
        run = getattr(self, "_" + self.kind)
        if not getattr(self.ctx.score_model, "patchwise", False):
            return run(inputs, self.params, generator)
        # sliding window: the network sees one patch at a time, so its field of view is the patch;
        # optimise a patch-sized input (deep dream / inversion: the input's central patch)
        grid = self.ctx.score_model.runner.grid(inputs.shape[2:], inputs.device)
        window = tuple(slice((p - r) // 2, (p - r) // 2 + r) for p, r in zip(grid.padded, grid.roi))
        patch = grid.pad_input(inputs.detach())[(slice(None), slice(None), *window)]
        out = run(patch, self.params, generator)
        canvas = out.new_zeros((out.shape[0], out.shape[1], *grid.padded))
        canvas[(slice(None), slice(None), *window)] = out
        start = [w.start - o for w, o in zip(window, grid.offset)]
        origin = " from the central patch of the input" if self.kind in _FROM_INPUT else ""
        add_note(notes_of(self.ctx), (
            f"{self.kind}: under sliding-window execution the network sees one patch, so an input of the patch size "
            f"{list(grid.roi)} (its field of view) was optimised{origin} and placed at the centre of the volume "
            f"(from voxel {start}); the rest is zero"))
        return grid.crop(canvas)

    def _activation_maximisation(self, x: torch.Tensor, p: Mapping[str, Any],
                                 g: torch.Generator) -> torch.Tensor:
        channel, neuron = p["channel"], p["objective"] == "neuron"

        def objective(act: torch.Tensor) -> torch.Tensor:
            check_channel(act, channel, self.ctx)
            a = act[:, channel]
            if neuron and a.dim() > 1:  # the unit at the centre of the layer's grid
                a = a[(slice(None), *(s // 2 for s in a.shape[1:]))]
            return _spatial_mean(a)

        start = _noise(tuple(x.shape), p["init_std"], x, g)
        return optimise(self.ctx, start, objective, _settings(p), g)

    def _layer_visualisation(self, x: torch.Tensor, p: Mapping[str, Any],
                             g: torch.Generator) -> torch.Tensor:
        n, c, *spatial = x.shape
        with torch.no_grad():  # the channel count, from a forward pass of one noise volume
            count = layer_activation(self.ctx, _noise((1, c, *spatial), p["init_std"], x, g)).shape[1]
        k = count if p["channels"] == 0 else min(p["channels"], count)
        # one volume per (input, channel), all optimised together: batch index = i * k + channel
        start = _noise((n * k, c, *spatial), p["init_std"], x, g)
        wanted = torch.arange(k, device=x.device).repeat(n)

        def objective(act: torch.Tensor) -> torch.Tensor:
            a = act[torch.arange(act.shape[0], device=act.device), wanted]
            return _spatial_mean(a)

        result = optimise(self.ctx, start, objective, _settings(p), g)
        return result.reshape(n, k * c, *spatial)

    def _deep_dream(self, x: torch.Tensor, p: Mapping[str, Any], g: torch.Generator) -> torch.Tensor:
        def objective(act: torch.Tensor) -> torch.Tensor:  # Lucent's deepdream: mean square
            return _spatial_mean(act.pow(2).reshape(act.shape[0], -1))

        return optimise(self.ctx, x.detach(), objective, _settings(p), g)

    def _inverted_representation(self, x: torch.Tensor, p: Mapping[str, Any],
                                 g: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            reference = layer_activation(self.ctx, x.detach()).detach()
        norm = reference.pow(2).reshape(reference.shape[0], -1).sum(dim=1).clamp(min=1e-12)

        def objective(act: torch.Tensor) -> torch.Tensor:
            return -inversion_loss(act, reference, norm)

        start = _noise(tuple(x.shape), p["init_std"], x, g)
        return optimise(self.ctx, start, objective, _settings(p), g)


def inversion_loss(act: torch.Tensor, reference: torch.Tensor,
                   norm: torch.Tensor | None = None) -> torch.Tensor:
    """``||act - reference||^2 / ||reference||^2`` per input (Mahendran & Vedaldi 2015)."""
    if norm is None:
        norm = reference.pow(2).reshape(reference.shape[0], -1).sum(dim=1).clamp(min=1e-12)
    return (act - reference).pow(2).reshape(act.shape[0], -1).sum(dim=1) / norm


register_patchwise_mode(PatchwiseMode(
    "patch_field_of_view", True, summary="feature visualisation: optimises an input of the patch size (the network's "
    "field of view under a sliding window), placed at the centre of the volume; the map's notes say so"))


def _register(name: str, title: str, summary: str, params: tuple[Param, ...], reference: str,
              extra_calls: int = 0) -> None:
    def build(ctx: MethodContext, p: Mapping[str, Any]) -> Call:
        return Call(_Optimised(ctx, p, name), passes_target=False)

    def cost(info: CostInfo, p: Mapping[str, Any]) -> int:
        return p["steps"] + extra_calls

    register(MethodSpec(name=name, family="visualisation", output_grid="volume",
                        explains_class=False, evaluable=False, title=title, summary=summary,
                        params=params, build=build, needs_layer=True, needs_hooks=True,
                        reference=reference, patchwise="patch_field_of_view", cost=cost))


_OLAH = ("Olah, Mordvintsev & Schubert 2017, Feature Visualization, Distill, "
         "doi:10.23915/distill.00007 (regularisers and Fourier parameterisation as in Lucid/Lucent)")

_register("activation_maximisation", "Activation Maximisation",
          "a volume, optimised from noise, that maximises one channel (or its centre unit) of the layer",
          (CHANNEL, Param("objective", "str", "channel",
                          "maximise the channel's mean, or its unit at the centre of the layer grid",
                          choices=("channel", "neuron")), STEPS, INIT_STD, *OPTIMISATION),
          "Erhan et al. 2009, Visualizing Higher-Layer Features of a Deep Network; " + _OLAH)
_register("layer_visualisation", "Layer Visualisation",
          "one volume per channel of the layer, each optimised from noise to maximise its channel",
          (Param("channels", "int", 8, "visualise channels 0..channels-1 (0: all of the layer's); "
                 "they are optimised as one batch, so memory grows with it", minimum=0, maximum=4096),
           STEPS, INIT_STD, *OPTIMISATION),
          "Yosinski et al. 2015, Understanding Neural Networks Through Deep Visualization, "
          "arXiv:1506.06579; " + _OLAH, extra_calls=1)
_register("deep_dream", "DeepDream",
          "the input volume changed to amplify whatever the layer already responds to "
          "(maximises the mean squared activation)",
          (STEPS, *OPTIMISATION),
          "Mordvintsev, Olah & Tyka 2015, Inceptionism: Going Deeper into Neural Networks; "
          + _OLAH)
_register("inverted_representation", "Inverted Representation",
          "a volume, optimised from noise, whose layer activations match those of the input",
          (STEPS, INIT_STD, *OPTIMISATION),
          "Mahendran & Vedaldi 2015, Understanding Deep Image Representations by Inverting Them, "
          "CVPR, arXiv:1412.0035", extra_calls=1)
