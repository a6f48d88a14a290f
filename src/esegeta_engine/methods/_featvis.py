"""The optimisation behind feature visualisation: image parameterisations, regularisers, the loop.

An input volume ``(N, C, *spatial)`` (2D or 3D) is optimised by Adam so that an objective of one
layer's activations grows (or a reconstruction loss shrinks), as in Olah et al. 2017, "Feature
Visualization" (Distill) and Mahendran & Vedaldi 2015. The volume is either the voxels
themselves (``pixel``) or a spectrum whose inverse real FFT gives it (``fourier``): each frequency
is scaled by ``1 / |f| ** decay``, which decorrelates neighbouring voxels so that steps favour
smooth structure over high-frequency noise. Regularisers: random jitter (a seeded roll of the
volume before each forward pass), total variation and an L2 penalty.

Every model evaluation goes through ``ScoreModel.model_output`` (counted, cancellable, time
limited); the layer's activation is read by a forward hook that exists only during that call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.registry import MethodContext


@dataclass(frozen=True)
class Settings:
    """How to optimise: steps, step size, parameterisation and regularisers.

    Attributes
    ----------
    steps : int
        Adam steps; each is one model evaluation.
    lr : float
        Adam learning rate (in the parameterisation's units).
    parameterisation : {"fourier", "pixel"}
        Optimise a decorrelated spectrum or the voxels.
    decay : float
        Spectrum scaling ``1 / |f| ** decay`` (``fourier`` only; 0 is plain FFT).
    jitter : int
        Largest random shift in voxels along each spatial axis before each step (0: none).
    tv_weight, l2_weight : float
        Weights of the total-variation and L2 penalties on the volume.
    """

    steps: int
    lr: float
    parameterisation: str = "fourier"
    decay: float = 1.0
    jitter: int = 0
    tv_weight: float = 0.0
    l2_weight: float = 0.0


class TrainableVolume:
    """A trainable volume, as voxels or as a frequency-scaled spectrum.

    Parameters
    ----------
    start : torch.Tensor
        ``(N, C, *spatial)``: the volume at step 0 (exactly, for both parameterisations).
    kind : {"fourier", "pixel"}
        Parameterisation.
    decay : float
        Frequency decay of the ``fourier`` scaling.
    """

    def __init__(self, start: torch.Tensor, kind: str = "fourier", decay: float = 1.0) -> None:
        self.kind = kind
        self.shape = tuple(start.shape[2:])
        self.dims = tuple(range(2, start.dim()))
        if kind == "pixel":
            self.param = start.detach().clone().requires_grad_(True)
            return
        self.scale = frequency_scale(self.shape, decay, start.device, start.dtype)
        spectrum = torch.fft.rfftn(start.detach(), dim=self.dims, norm="ortho") / self.scale
        self.param = torch.view_as_real(spectrum).clone().requires_grad_(True)

    def image(self) -> torch.Tensor:
        """The current volume ``(N, C, *spatial)``, differentiable in :attr:`param`."""
        if self.kind == "pixel":
            return self.param
        spectrum = torch.view_as_complex(self.param) * self.scale
        return torch.fft.irfftn(spectrum, s=self.shape, dim=self.dims, norm="ortho")


def frequency_scale(shape: tuple[int, ...], decay: float, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """``1 / max(|f|, 1/max(shape)) ** decay`` on the ``rfftn`` grid, normalised to max 1."""
    axes = [torch.fft.fftfreq(n, device=device, dtype=dtype) for n in shape[:-1]]
    axes.append(torch.fft.rfftfreq(shape[-1], device=device, dtype=dtype))
    grids = torch.meshgrid(*axes, indexing="ij")
    freq = torch.sqrt(sum(g ** 2 for g in grids))
    scale = freq.clamp(min=1.0 / max(shape)) ** -decay
    return scale / scale.max()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per input: mean ``|x[i+1] - x[i]|`` summed over spatial axes."""
    tv = x.new_zeros(x.shape[0])
    for axis in range(2, x.dim()):
        tv = tv + x.diff(dim=axis).abs().flatten(1).mean(dim=1)
    return tv


def jitter(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Roll ``x`` by a seeded random shift in ``[-max_shift, max_shift]`` on each spatial axis."""
    if max_shift <= 0:
        return x
    dims = tuple(range(2, x.dim()))
    shifts = torch.randint(-max_shift, max_shift + 1, (len(dims),), generator=generator).tolist()
    return torch.roll(x, shifts=shifts, dims=dims)


@contextlib.contextmanager
def _tap(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def layer_activation(ctx: MethodContext, x: torch.Tensor) -> torch.Tensor:
    """The output of ``ctx.layer`` for input ``x``: one counted evaluation of the score model.

    Raises
    ------
    MethodError
        If the layer does not run exactly once, or gives no tensor.
    """
    model_output = getattr(ctx.score_model, "model_output", None)
    if model_output is None or ctx.layer is None:
        raise MethodError("feature visualisation needs the engine's score model and a layer",
                          "run it through esegeta_engine.explain.Explainer with `layers: [name]`")
    runner = getattr(ctx.score_model, "runner", None)
    with _tap(ctx.layer) as seen:
        if getattr(ctx.score_model, "patchwise", False):
            # an input of the patch size: the network itself, one patch batch at a time
            ctx.score_model.monitor.check()
            runner.run_patches(x, grad=torch.is_grad_enabled())
            ctx.score_model.monitor.evaluated(x.shape[0])
            batches = -(-x.shape[0] // runner.settings.sw_batch_size)
            if len(seen) == batches > 1 and all(isinstance(a, torch.Tensor) for a in seen):
                seen[:] = [torch.cat(seen)]
        else:
            model_output(x)
    name = ctx.layer_name or type(ctx.layer).__name__
    if len(seen) != 1 or not isinstance(seen[0], torch.Tensor) or seen[0].dim() < 2:
        raise MethodError(
            f"layer '{name}' ran {len(seen)} times in the forward pass or gave no (N, C, ...) tensor",
            "choose a module the model calls once, such as a convolution (`esegeta layers MODEL`)",
        )
    return seen[0]


def check_channel(act: torch.Tensor, channel: int, ctx: MethodContext) -> None:
    """Raise :class:`MethodError` if ``channel`` is not a channel of ``act``."""
    if not 0 <= channel < act.shape[1]:
        name = ctx.layer_name or type(ctx.layer).__name__
        raise MethodError(
            f"filter index {channel} is beyond the layer's channels: layer '{name}' has "
            f"{act.shape[1]} channels",
            f"set the method's channel to 0..{act.shape[1] - 1}",
        )


Objective = Callable[[torch.Tensor], torch.Tensor]
"""``objective(activation) -> (N,)``: what the optimisation maximises for each input."""


def optimise(ctx: MethodContext, start: torch.Tensor, objective: Objective, settings: Settings,
             generator: torch.Generator) -> torch.Tensor:
    """Maximise ``objective(layer activation) - penalties`` over the volume, from ``start``.

    Parameters
    ----------
    ctx : MethodContext
        Score model and layer.
    start : torch.Tensor
        ``(B, C, *spatial)`` initial volumes (each optimised independently).
    objective : callable
        Activation ``(B, ...)`` -> ``(B,)`` values to maximise.
    settings : Settings
        Steps, learning rate, parameterisation, regularisers.
    generator : torch.Generator
        Seeds the jitter.

    Returns
    -------
    torch.Tensor
        The optimised volumes ``(B, C, *spatial)``, detached.
    """
    volume = TrainableVolume(start, settings.parameterisation, settings.decay)
    optimiser = torch.optim.Adam([volume.param], lr=settings.lr)
    with torch.enable_grad():
        for _ in range(settings.steps):
            image = volume.image()
            act = layer_activation(ctx, jitter(image, settings.jitter, generator))
            loss = -objective(act).sum()
            if settings.tv_weight:
                loss = loss + settings.tv_weight * total_variation(image).sum()
            if settings.l2_weight:
                loss = loss + settings.l2_weight * image.pow(2).flatten(1).mean(dim=1).sum()
            # gradients of the volume only: the model's parameters accumulate nothing
            (volume.param.grad,) = torch.autograd.grad(loss, [volume.param])
            optimiser.step()
        return volume.image().detach()
