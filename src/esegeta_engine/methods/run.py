"""Run one registered method: build its call, optionally wrap it in a noise
tunnel, call ``attribute``, and bring layer maps back to the input grid."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import NoiseTunnel

from esegeta_engine.errors import MethodError
from esegeta_engine.methods.notes import add_note, notes_of
from esegeta_engine.methods.registry import Call, MethodContext, MethodSpec

NOISE_TUNNEL_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")

# Captum warns on every call about things the engine does on purpose.
warnings.filterwarnings("ignore", message=r"Input Tensor \d+ did not already require gradients")
warnings.filterwarnings("ignore", message=r"Setting backward hooks on ReLU activations")
warnings.filterwarnings("ignore", message=r"Setting forward, backward hooks and attributes on non-linear")


def pipeline_refusal(spec: Any, layers: Sequence[str], pipeline: Any) -> MethodError | None:
    """Why a deployed pipeline (nnU-Net, bundle) refuses ``spec``, or ``None``.

    The one rule, asked by :func:`check_applicable` when the method runs and by the dry run
    before any work: the whole method (``method_refusal``), then each of its layers
    (``layer_method_refusal``). ``pipeline`` without them (a plain network) refuses nothing.
    """
    whole = getattr(pipeline, "method_refusal", None)
    why = whole(spec.name) if callable(whole) else None
    if why is None and getattr(spec, "needs_layer", False):
        per_layer = getattr(pipeline, "layer_method_refusal", None)
        for layer in layers if callable(per_layer) else ():
            why = per_layer(spec.name, layer)
            if why is not None:
                break
    return MethodError(*why) if why is not None else None


def check_applicable(spec: MethodSpec, ctx: MethodContext) -> None:
    """Raise :class:`MethodError` if ``spec`` cannot run in ``ctx``, saying why."""
    if spec.needs_hooks and ctx.torchscript:
        raise MethodError(
            f"method '{spec.name}' needs Python module hooks, which TorchScript models do not run",
            "load the model as a state dict plus its class (model.format: state_dict, "
            "model.class_path: package.module:Class) to use this method",
        )
    if spec.needs_layer and ctx.layer is None:
        raise MethodError(
            f"method '{spec.name}' needs a layer",
            "give one with `layers: [name]`; `esegeta layers MODEL` lists the module names",
        )
    pipe = getattr(getattr(ctx.score_model, "net", None), "model", None)  # a deployed pipeline (nnU-Net, bundle)
    err = pipeline_refusal(spec, [ctx.layer_name or ""], pipe)
    if err is not None:
        raise err
    if spec.needs_batch and ctx.inputs.shape[0] < 2:
        raise batch_refusal(spec, patchwise=False)


BATCH_ALTERNATIVES = ("feature_ablation (the same supervoxels replaced by a baseline, one volume at a time) "
                      "or occlusion")
"""What to use instead of a method that permutes features across a batch of volumes."""


def batch_refusal(spec: MethodSpec, patchwise: bool) -> MethodError:
    """Why ``spec`` (a method that permutes features across a batch of volumes) cannot run.

    ``patchwise``: under sliding-window execution (refused there even with several volumes);
    otherwise for a single volume, whose map has no meaning.
    """
    what = (f"method '{spec.name}' permutes each supervoxel across a batch of several volumes: a map is "
            "the score change when a volume's supervoxel is swapped with another volume's")
    if patchwise:
        return MethodError(
            f"{what}; it has no patch-wise form under sliding-window execution, and with one volume there is "
            "nothing to swap with, so the map has no meaning",
            f"use {BATCH_ALTERNATIVES}, which run patch-wise; or give several volumes of one shape with "
            "execution.mode: whole if the network takes them whole")
    return MethodError(
        f"{what}; with one volume there is nothing to swap with and the map has no meaning (all zeros)",
        "give several volumes of one shape in one run (volumes: [a.nii.gz, b.nii.gz, ...]), or use "
        f"{BATCH_ALTERNATIVES}")


def attribute(
    spec: MethodSpec,
    ctx: MethodContext,
    params: Mapping[str, Any],
    noise_tunnel: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Compute the attribution of ``ctx.target`` for ``ctx.inputs``.

    Parameters
    ----------
    spec : MethodSpec
        The method.
    ctx : MethodContext
        Model, inputs, target class and layer.
    params : mapping
        Validated parameters (see :meth:`MethodSpec.resolve_params`).
    noise_tunnel : mapping, optional
        ``{"type": "smoothgrad", "samples": 8, "stdev": 0.1}`` to average the
        method over noisy copies of the input (SmoothGrad, Smilkov et al. 2017).

    Returns
    -------
    torch.Tensor
        A detached float tensor; input-grid methods return the input's shape,
        layer methods ``(N, C_layer or 1, *spatial)`` on the input grid when
        their ``upsample`` parameter is true (default).

    Notes
    -----
    For the axiom checks (:mod:`esegeta_engine.evaluation.axioms`) this records in
    ``ctx.extra``: ``"baselines"`` (the reference input(s) the method used, or ``None``),
    ``"attribution_sum"`` (per-example sum of the raw attribution, before a layer map is
    resampled to the input grid), ``"noise_tunnel"`` (whether it was averaged over noise) and
    ``"batch"`` (inputs explained together); for methods with an axiom also ``"tapped_scores"``
    (:class:`ScoreTap`: scores of the input and baseline rows the method evaluated itself).
    """
    check_applicable(spec, ctx)
    call = spec.build(ctx, params)
    algorithm = call.algorithm
    kwargs = dict(call.kwargs)
    ctx.extra["baselines"] = call_baselines(call)
    ctx.extra["noise_tunnel"] = bool(noise_tunnel)
    ctx.extra["batch"] = int(ctx.inputs.shape[0])
    if noise_tunnel:
        if not spec.noise_tunnel:
            raise MethodError(
                f"method '{spec.name}' cannot be wrapped in a noise tunnel",
                "use noise_tunnel with a gradient method such as saliency or integrated_gradients",
            )
        algorithm = NoiseTunnel(algorithm)
        kwargs.update(
            nt_type=noise_tunnel.get("type", "smoothgrad"),
            nt_samples=int(noise_tunnel.get("samples", 8)),
            nt_samples_batch_size=noise_tunnel.get("batch_size"),
            stdevs=float(noise_tunnel.get("stdev", 0.1)),
        )
    if call.passes_target:
        kwargs["target"] = ctx.target
    pipe_notes = getattr(getattr(getattr(ctx.score_model, "net", None), "model", None), "layer_notes", None)
    if isinstance(pipe_notes, list):  # a deployed pipeline's notes on its layer copies (mirror moves): this run's
        pipe_notes.clear()
    tap = ScoreTap(ctx.inputs, ctx.extra["baselines"]) if spec.axiom and not noise_tunnel else None
    handle = ctx.score_model.register_forward_hook(tap) if tap is not None else None
    try:
        with torch.random.fork_rng(devices=_devices(ctx.inputs)):
            torch.manual_seed(ctx.seed)
            result = algorithm.attribute(ctx.inputs, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    if tap is not None:
        ctx.extra["tapped_scores"] = tap.found
    pipe_notes = getattr(getattr(getattr(ctx.score_model, "net", None), "model", None), "layer_notes", None)
    for note in pipe_notes if isinstance(pipe_notes, list) else []:
        add_note(notes_of(ctx), note)
    if isinstance(result, (tuple, list)):
        result = result[0]
    result = result.detach()
    raw = ctx.extra.pop("raw_attribution_sum", None)  # patch-wise layer methods: every copy's total
    ctx.extra["attribution_sum"] = raw.double().cpu() if raw is not None else result.flatten(1).sum(1).double().cpu()
    if spec.output_grid == "layer":
        result = _layer_to_input_grid(result, ctx, params)
    return result.float()


class ScoreTap:
    """Forward hook on the score model keeping the scores it computed for the unchanged input
    and baseline rows during a method's own evaluations (DeepLIFT evaluates both), so the
    completeness check need not evaluate them again.

    ``found`` maps ``("input", i)`` / ``("baseline", j)`` to the detached score vector.
    """

    def __init__(self, inputs: torch.Tensor, baselines: torch.Tensor | None) -> None:
        self.refs = [("input", i, inputs[i].detach()) for i in range(inputs.shape[0])]
        if baselines is not None:
            self.refs += [("baseline", j, baselines[j].detach()) for j in range(baselines.shape[0])]
        self.found: dict[tuple[str, int], torch.Tensor] = {}

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or x.dim() < 2:
            return
        if len(self.found) == len(self.refs) or tuple(x.shape[1:]) != tuple(self.refs[0][2].shape):
            return
        rows = x.detach()
        for kind, k, ref in self.refs:
            if (kind, k) in self.found:
                continue
            for r in range(rows.shape[0]):
                if torch.equal(rows[r], ref):
                    self.found[(kind, k)] = output[r].detach().double().cpu()
                    break


def call_baselines(call: Call) -> torch.Tensor | None:
    """The baseline(s) a built call uses: its ``baselines`` keyword, or the distribution a
    seeded SHAP algorithm owns (``None`` for methods without a baseline)."""
    found = call.kwargs.get("baselines", getattr(call.algorithm, "baselines", None))
    return found.detach() if isinstance(found, torch.Tensor) else None


def _devices(x: torch.Tensor) -> list[int]:
    return [x.device.index or 0] if x.device.type == "cuda" else []


def _layer_to_input_grid(
    result: torch.Tensor, ctx: MethodContext, params: Mapping[str, Any]
) -> torch.Tensor:
    reduce = params.get("channel_reduce", "sum")
    if result.dim() == ctx.inputs.dim():
        if reduce == "sum":
            result = result.sum(dim=1, keepdim=True)
        elif reduce == "mean":
            result = result.mean(dim=1, keepdim=True)
    elif result.dim() == 2:  # a linear layer (N, features): no spatial grid to map to
        return result
    net = getattr(getattr(ctx.score_model, "net", None), "model", None)
    to_input = getattr(net, "layer_map_to_input", None)  # e.g. nnU-Net's network grid -> the scan
    mapped = to_input(ctx.layer_name, result) if callable(to_input) and result.dim() == ctx.inputs.dim() else None
    if mapped is not None:
        return mapped
    if params.get("upsample", True) and result.dim() == ctx.inputs.dim():
        size = tuple(ctx.inputs.shape[2:])
        if tuple(result.shape[2:]) != size:
            mode = "bilinear" if len(size) == 2 else "trilinear"
            result = F.interpolate(result, size=size, mode=mode, align_corners=False)
    return result
