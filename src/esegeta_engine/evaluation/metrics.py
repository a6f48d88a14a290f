"""Faithfulness and robustness of attribution maps: infidelity and max-sensitivity.

Both follow Yeh et al. 2019, *On the (In)fidelity and Sensitivity of
Explanations*, NeurIPS, arXiv:1901.09392, and are computed by Captum's own
:func:`captum.metrics.infidelity` and :func:`captum.metrics.sensitivity_max`;
this module only supplies seeded perturbation functions, passes the explained
target, batches through ``max_examples_per_batch`` and turns the per-example
tensors into one plain float (the batch mean; ``nan`` when not finite).

Lower is better for both: infidelity is the (optionally scale-normalised) mean
squared error between ``attribution . I`` and ``f(x) - f(x - I)`` for Gaussian
perturbations ``I``; max-sensitivity is the largest relative change of the map
when the input moves inside an L-infinity ball.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
from captum.metrics import infidelity, sensitivity_max
from torch import nn

from esegeta_engine.methods.registry import MethodContext, MethodSpec
from esegeta_engine.methods.run import attribute

__all__ = [
    "LAYER_SENSITIVITY_NOTE",
    "gaussian_perturbation",
    "infidelity_score",
    "sensitivity_score",
    "uniform_perturbation",
]

#: Recorded for layer methods by :func:`sensitivity_score`.
LAYER_SENSITIVITY_NOTE = (
    "layer method: sensitivity is measured on the layer map upsampled to the input grid "
    "(and reduced over channels as the method's channel_reduce says), not on the raw layer map"
)


def _generator(seed: int, device: torch.device, state: dict[str, torch.Generator]) -> torch.Generator:
    key = str(device)
    if key not in state:
        state[key] = torch.Generator(device=device).manual_seed(seed)
    return state[key]


def gaussian_perturbation(
    noise_scale: float = 0.05, seed: int = 0
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Infidelity perturbation ``I ~ N(0, noise_scale^2)`` per voxel, seeded.

    Parameters
    ----------
    noise_scale : float
        Standard deviation of the noise, in input units (inputs are normalised
        by the preprocessing, so 0.05 is 5 % of a min-max range or of one SD).
    seed : int
        Seed of the function's own :class:`torch.Generator`; the global RNG is
        not used or changed. Each call draws the next samples of that stream.

    Returns
    -------
    callable
        ``perturb(inputs) -> (I, inputs - I)``, the form
        :func:`captum.metrics.infidelity` expects.
    """
    state: dict[str, torch.Generator] = {}

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(seed, inputs.device, state)
        noise = torch.randn(inputs.shape, generator=g, device=inputs.device, dtype=inputs.dtype)
        noise = noise * noise_scale
        return noise, inputs - noise

    return perturb


def uniform_perturbation(seed: int = 0) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """Sensitivity perturbation: uniform noise in the L-infinity ball, seeded.

    The same sampling as Captum's ``default_perturb_func`` but from the
    function's own :class:`torch.Generator` seeded with ``seed``.

    Returns
    -------
    callable
        ``perturb(inputs, perturb_radius) -> perturbed inputs``.
    """
    state: dict[str, torch.Generator] = {}

    def perturb(inputs: torch.Tensor, perturb_radius: float) -> torch.Tensor:
        g = _generator(seed, inputs.device, state)
        noise = torch.rand(inputs.shape, generator=g, device=inputs.device, dtype=inputs.dtype)
        return inputs + (noise * 2.0 - 1.0) * perturb_radius

    return perturb


def _captum_to_tiled(x: torch.Tensor, n: int) -> torch.Tensor:
    """Captum's metrics repeat each example ``m`` times in a row ([x0, x0, x1, x1]);
    the engine's frozen targets expect copies stacked per step ([x0, x1, x0, x1])."""
    m = x.shape[0] // n
    if n == 1 or m == 1:
        return x
    return x.reshape(n, m, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def _tiled_to_captum(y: torch.Tensor, n: int) -> torch.Tensor:
    m = y.shape[0] // n
    if n == 1 or m == 1:
        return y
    return y.reshape(m, n, *y.shape[1:]).transpose(0, 1).reshape(y.shape)


def _as_float(values: torch.Tensor) -> float:
    value = float(values.detach().double().mean().cpu())
    return value if math.isfinite(value) else float("nan")


def _match_attribution(inputs: torch.Tensor, attribution: torch.Tensor) -> torch.Tensor:
    attribution = attribution.detach().to(inputs.device, inputs.dtype)
    if attribution.dim() == inputs.dim() - 1:
        attribution = attribution.unsqueeze(1)
    if attribution.shape != inputs.shape and attribution.dim() == inputs.dim() \
            and attribution.shape[1] == 1 and attribution.shape[2:] == inputs.shape[2:]:
        attribution = attribution.expand_as(inputs)  # one map shared by all input channels
    if attribution.shape != inputs.shape:
        raise ValueError(f"the attribution has shape {tuple(attribution.shape)}, the inputs "
                         f"{tuple(inputs.shape)}: infidelity needs a map on the input grid")
    return attribution


def infidelity_score(
    score_model: nn.Module,
    inputs: torch.Tensor,
    attribution: torch.Tensor,
    target: int,
    *,
    n_perturb_samples: int = 16,
    noise_scale: float = 0.05,
    max_examples_per_batch: int | None = None,
    seed: int = 0,
    normalize: bool = True,
) -> float:
    """Infidelity of ``attribution`` for score ``target`` (Yeh et al. 2019), via Captum.

    Parameters
    ----------
    score_model : nn.Module
        ``x -> (N, K)`` scores, usually a :class:`~esegeta_engine.forward.scoring.ScoreModel`
        (its monitor counts the evaluations and can cancel the run).
    inputs : torch.Tensor
        The explained batch ``(N, C, *spatial)``.
    attribution : torch.Tensor
        Map on the input grid: the input's shape, ``(N, 1, *spatial)`` (shared
        by all input channels) or ``(N, *spatial)``.
    target : int
        Index of the explained score; passed to Captum so ``f`` is that score.
    n_perturb_samples : int
        Gaussian perturbations per example (one model evaluation each).
    noise_scale : float
        Standard deviation of the perturbation, see :func:`gaussian_perturbation`.
    max_examples_per_batch : int, optional
        Most perturbed inputs per model call (Captum's batching); lower it for
        large volumes. ``None``: all ``N * n_perturb_samples`` at once.
    seed : int
        Seed of the perturbations (the global RNG is left alone).
    normalize : bool
        Scale the attribution by the least-squares optimal factor first
        (Captum's ``normalize``), making the score invariant to map scale.

    Returns
    -------
    float
        Mean infidelity over the batch (lower is better); ``nan`` if not finite.

    Notes
    -----
    Captum re-evaluates the unperturbed input once per sub-batch; the wrapper
    here computes that output once and reuses it (the model is deterministic in
    eval mode), so the cost is ``n_perturb_samples`` perturbed evaluations plus one.
    """
    inputs = inputs.detach()
    attribution = _match_attribution(inputs, attribution)
    n = inputs.shape[0]
    cache: dict[str, torch.Tensor] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x is inputs:  # Captum passes the original tensor object for f(x)
            if "clean" not in cache:
                cache["clean"] = score_model(x)
            return cache["clean"]
        return _tiled_to_captum(score_model(_captum_to_tiled(x, n)), n)

    values = infidelity(
        forward,
        gaussian_perturbation(noise_scale, seed),
        inputs,
        attribution,
        target=target,
        n_perturb_samples=n_perturb_samples,
        max_examples_per_batch=max_examples_per_batch,
        normalize=normalize,
    )
    return _as_float(values)


def sensitivity_score(
    spec: MethodSpec,
    ctx: MethodContext,
    params: Mapping[str, Any],
    *,
    n_perturb_samples: int = 8,
    perturb_radius: float = 0.02,
    max_examples_per_batch: int | None = None,
    seed: int = 0,
    noise_tunnel: Mapping[str, Any] | None = None,
    notes: list[str] | None = None,
) -> float:
    """Max-sensitivity of a method (Yeh et al. 2019), via Captum's ``sensitivity_max``.

    The method is re-run through :func:`esegeta_engine.methods.attribute` on
    ``n_perturb_samples`` copies of ``ctx.inputs`` moved uniformly inside an
    L-infinity ball of radius ``perturb_radius``; the score is the largest
    ``||map(x') - map(x)|| / ||map(x)||`` (Frobenius norms).

    Layer methods are evaluated on their maps *upsampled to the input grid*
    (as :func:`attribute` returns them with ``upsample`` true), not on the raw
    layer maps; :data:`LAYER_SENSITIVITY_NOTE` is appended to ``notes`` then.

    Parameters
    ----------
    spec : MethodSpec
        The method.
    ctx : MethodContext
        Score model, inputs, target, layer and method seed; every run of the
        method starts from ``torch.manual_seed(ctx.seed)`` inside a forked RNG,
        so sampling methods draw the same samples for clean and perturbed inputs.
    params : mapping
        The method's parameters (defaults are filled in).
    n_perturb_samples : int
        Perturbed copies per example.
    perturb_radius : float
        Half-width of the uniform perturbation, in input units.
    max_examples_per_batch : int, optional
        Most perturbed inputs explained in one method call (Captum's batching).
    seed : int
        Seed of the perturbations (:func:`uniform_perturbation`).
    noise_tunnel : mapping, optional
        Noise tunnel settings passed on to :func:`attribute`.
    notes : list of str, optional
        Receives notes about how the score was computed.

    Returns
    -------
    float
        Mean over the batch of the max-sensitivity (lower is more robust);
        ``nan`` if not finite. A constant zero map gives 0 unless the
        perturbed maps differ (Captum divides by 1 for a zero norm).
    """
    params = spec.resolve_params(params)
    n = ctx.inputs.shape[0]
    if spec.output_grid == "layer" and notes is not None:
        notes.append(LAYER_SENSITIVITY_NOTE)
    devices = [ctx.inputs.device.index or 0] if ctx.inputs.device.type == "cuda" else []

    def explain(x: torch.Tensor | tuple[torch.Tensor, ...], **_: Any) -> Any:
        # Captum passes the clean inputs as a 1-tuple and then iterates over the
        # result, so a tuple must come back as a tuple (a tensor would be
        # iterated over its batch axis).
        packed = isinstance(x, tuple)
        sub = replace(ctx, inputs=_captum_to_tiled((x[0] if packed else x).detach(), n))
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(ctx.seed)
            result = _tiled_to_captum(attribute(spec, sub, params, noise_tunnel), n)
        return (result,) if packed else result

    values = sensitivity_max(
        explain,
        ctx.inputs.detach(),
        perturb_func=uniform_perturbation(seed),
        perturb_radius=perturb_radius,
        n_perturb_samples=n_perturb_samples,
        max_examples_per_batch=max_examples_per_batch,
        target=ctx.target,
    )
    return _as_float(values)
