"""Axiom checks: does a map satisfy the identity its method promises?

Methods flagged with ``axiom`` in the registry promise *completeness*: the
attributions sum to the change of the explained score between the baseline and
the input, ``sum(A) = F(x) - F(b)`` (Sundararajan et al. 2017, Integrated
Gradients; Shrikumar et al. 2017, DeepLIFT's summation-to-delta; Dhamdhere et
al. 2018, layer conductance; Lundberg & Lee 2017, SHAP's local accuracy, in
expectation for Gradient SHAP). A map that misses it by much is not what the
method's paper describes: Integrated Gradients with too few steps on a
scale-invariant (instance-normalised) network, DeepLIFT through modules it has
no rule for. The check costs at most one evaluation of the score model (the input and
the baseline(s) in one batch), none where the method evaluated them itself (DeepLIFT) and reuses the baseline the method used
(recorded by :func:`esegeta_engine.methods.run.attribute` in ``ctx.extra``).

The *completeness error* is ``|sum(A) - (F(x) - F(b))| / |F(x) - F(b)|``
(``F(b)`` the mean over a baseline distribution). It is undefined, with the
reason, for a noise-tunnel map, DeepLIFT multipliers, a non-finite map, or an
input scoring the same as its baseline (nothing to distribute).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from esegeta_engine.methods.registry import MethodContext, MethodSpec
from esegeta_engine.methods.run import call_baselines

__all__ = ["AXIOM_KEYS", "THRESHOLDS", "completeness_check", "unsupported_modules"]

#: Relative completeness error above which a map is flagged, per axiom kind.
THRESHOLDS = {"completeness": 0.05, "expected_completeness": 0.25, "conservation": 0.05}
#: Keys an axiom check adds to a map's metrics.
AXIOM_KEYS = ("completeness_error", "axiom_status", "axiom_note")

def unsupported_modules(spec: MethodSpec, model: nn.Module) -> str | None:
    """Name the modules of ``model`` that ``spec``'s propagation rules do not cover.

    Derived from the rules that run, never from a list of its own: DeepLIFT-family methods
    have a rule where Captum's DeepLIFT has one (:func:`~esegeta_engine.methods.deeplift_safe.has_rule`)
    or the module is linear (its gradient is the multiplier); guided backprop and deconvolution
    act on every module of :data:`~esegeta_engine.methods.rectifiers.RECTIFIERS` (without any,
    they equal the plain gradient).

    Returns
    -------
    str or None
        A sentence for the map's status, or ``None`` when nothing is missing.
    """
    from esegeta_engine.methods.deeplift_safe import LINEAR_MODULES, has_rule
    from esegeta_engine.methods.lrp import network_of, user_model
    from esegeta_engine.methods.rectifiers import RECTIFIERS

    model = user_model(network_of(model))
    counts: dict[str, int] = {}
    if "deeplift" in spec.name:
        for m in model.modules():
            if not m._modules and not has_rule(m) and not isinstance(m, LINEAR_MODULES) \
                    and type(m).__module__.startswith("torch.nn"):
                counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
        if counts:
            found = ", ".join(f"{k} (x{v})" for k, v in sorted(counts.items()))
            return f"DeepLIFT has no rule for {found}: they are passed through as gradients"
    if spec.name in ("guided_backprop", "deconvolution", "guided_gradcam"):
        if not any(isinstance(m, RECTIFIERS) for m in model.modules()):
            kinds = ", ".join(t.__name__ for t in RECTIFIERS)
            return (f"{spec.name} acts on rectifier modules ({kinds}) and the model has none "
                    "(functional or other activations): the map is the plain gradient's")
    return None


def _fix(spec: MethodSpec, params: Mapping[str, Any], unsupported: str | None, share: float | None = None) -> str:
    """The suggested fix of a failed axiom check; ``share`` is the map's sum over F(x) - F(baseline)."""
    if spec.axiom == "conservation":
        if spec.name == "lrp":
            softmax = (", and AttnLRP's softmax rule, whose Taylor bias term is not conservative"
                       if params.get("attention_rule") == "attnlrp" else "")
            return ("biases (folded batch-norm shifts, layer-norm betas, attention value/output biases, "
                    f"relative position biases and position embeddings included){softmax} and modules without a "
                    "rule absorb relevance, and "
                    "a smaller epsilon does not give it back on a network with biases: read the map as relative "
                    "(only bias-free ReLU networks conserve exactly, with the composite 'epsilon')")
        return "input-dependent normalisation (Instance/GroupNorm) breaks the identity: read the map as relative"
    if unsupported and "deeplift" in spec.name:
        return "use integrated_gradients with baseline: blur and more n_steps, or a model without these modules"
    if "n_steps" in params and share is not None and abs(share) < 1e-3 and params.get("baseline") != "blur":
        # the gradient along the straight path is orthogonal to it: F(a*x) = F(x), so F jumps at the baseline
        return ("use baseline: blur — the map sums to almost nothing of F(x) - F(baseline), so the function is "
                "scale-invariant along the path from this baseline (e.g. per-scan normalisation, as nnU-Net's "
                "z-score: F(a x) = F(x)) and its change happens at the baseline itself, where no step can see it; "
                "more n_steps will not help")
    if "n_steps" in params:
        fix = f"raise n_steps (now {params['n_steps']}, e.g. {max(64, 4 * int(params['n_steps']))})"
        if params.get("baseline") != "blur":
            fix += "; try baseline: blur (a scale-invariant network makes F jump near a zero baseline)"
        return fix
    if "n_samples" in params:
        return f"raise n_samples (now {params['n_samples']}) and n_baselines, or use integrated_gradients"
    return "try baseline: blur, or integrated_gradients with more n_steps"


def _scores(ctx: MethodContext, own: torch.Tensor, index: int, explained: int, n_baselines: int
            ) -> tuple[float, float]:
    """F(input) and mean F(baseline): reused from the method's own evaluations where it made
    them (``ctx.extra["tapped_scores"]``), the rest in one batched evaluation."""
    tapped = ctx.extra.get("tapped_scores") or {}
    rows = range(index, index + 1) if own.shape[0] == 1 and n_baselines == explained else range(n_baselines)
    known_x = tapped.get(("input", index))
    known_b = [tapped.get(("baseline", j)) for j in rows]
    missing = ([ctx.inputs] if known_x is None else []) + \
        [own[k:k + 1] for k, v in enumerate(known_b) if v is None]
    fresh: list[float] = []
    if missing:
        with torch.no_grad():  # one batched evaluation of whatever the method did not evaluate
            batch = torch.cat([m.to(ctx.inputs.device, ctx.inputs.dtype) for m in missing])
            fresh = [float(v) for v in ctx.score_model(batch)[:, ctx.target].double()]
    f_x = float(known_x[ctx.target]) if known_x is not None else fresh.pop(0)
    values = [float(v[ctx.target]) if v is not None else fresh.pop(0) for v in known_b]
    return f_x, sum(values) / len(values)


def _undefined(reason: str) -> dict[str, Any]:
    return {"completeness_error": None, "axiom_status": "undefined", "axiom_note": reason}


def completeness_check(spec: MethodSpec, ctx: MethodContext, params: Mapping[str, Any],
                       attribution: torch.Tensor, *, noise_tunnel: bool = False,
                       threshold: float | None = None) -> dict[str, Any]:
    """Completeness error of one map, with status and, above the threshold, the fix.

    Parameters
    ----------
    spec, params : MethodSpec, mapping
        The method and its validated parameters.
    ctx : MethodContext
        The context the method ran in (one input); ``ctx.extra`` holds what
        :func:`~esegeta_engine.methods.run.attribute` recorded (``baselines``,
        ``attribution_sum``, ``index``). Without it (a map loaded from a file), the baseline
        is rebuilt from the method (deterministic, seeded) and the sum taken from
        ``attribution``, which must then be on the method's own grid.
    attribution : torch.Tensor
        The map ``(1, C, *spatial)`` (used when ``ctx.extra`` has no sum).
    noise_tunnel : bool
        The map is a noise-tunnel average (no completeness then).
    threshold : float, optional
        Relative error above which the status is ``warning``; default per axiom kind
        (:data:`THRESHOLDS`).

    Returns
    -------
    dict
        ``completeness_error`` (float or ``None``), ``axiom_status`` (``ok``, ``warning``,
        ``undefined`` or ``none`` for a method without an axiom) and ``axiom_note`` (the
        reason or the suggested fix; empty when ok). Also ``F_input``, ``F_baseline`` and
        ``attribution_sum`` when defined.
    """
    unsupported = unsupported_modules(spec, ctx.score_model)
    if spec.axiom is None:
        return {"axiom_status": "none", "axiom_note": unsupported or ""}
    if noise_tunnel or ctx.extra.get("noise_tunnel"):
        return _undefined("a noise-tunnel map averages over noisy inputs: completeness is not defined")
    if params.get("multiply_by_inputs") is False:
        return _undefined("multiply_by_inputs is false: the map holds multipliers, not contributions")
    index = int(ctx.extra.get("index", 0))
    if spec.axiom == "conservation":
        return _conservation(spec, ctx, params, attribution, index, unsupported, threshold)
    baselines = ctx.extra.get("baselines")
    if baselines is None:  # a map from a file: the seeded build gives the same baseline
        baselines = call_baselines(spec.build(ctx, params))
    if baselines is None:
        return _undefined("the method records no baseline")
    total = ctx.extra.get("attribution_sum")
    if total is not None:
        total = float(total[index])
    elif spec.output_grid == "layer":
        return _undefined("a layer map resampled to the input grid no longer sums to the layer's attribution")
    else:
        total = float(attribution.double().sum())
    # One baseline per input of the method's batch -> this input's; a distribution -> all of it
    # (Captum's SHAP methods average every input over the whole pooled distribution).
    explained = int(ctx.extra.get("batch", 1))
    own = baselines[index:index + 1] if explained > 1 and baselines.shape[0] == explained else baselines
    f_x, f_b = _scores(ctx, own, index, explained, baselines.shape[0])
    delta = f_x - f_b
    numbers = {"F_input": f_x, "F_baseline": f_b, "attribution_sum": total}
    if not all(math.isfinite(v) for v in numbers.values()):
        return {**_undefined("the map or the scores are not finite"), **numbers}
    if abs(delta) <= 1e-7 * max(1.0, abs(f_x)):
        return {**_undefined("F(input) equals F(baseline): there is nothing to distribute"), **numbers}
    error = abs(total - delta) / abs(delta)
    limit = THRESHOLDS[spec.axiom] if threshold is None else threshold
    if error <= limit:
        note = unsupported or ""
        return {"completeness_error": error, "axiom_status": "ok", "axiom_note": note, **numbers}
    note = (f"attributions sum to {total:.4g} but F(x) - F(baseline) = {delta:.4g} "
            f"({100 * error:.0f}% off, limit {100 * limit:.0f}%)")
    if unsupported:
        note += f"; {unsupported}"
    return {"completeness_error": error, "axiom_status": "warning",
            "axiom_note": f"{note}; fix: {_fix(spec, params, unsupported, total / delta)}", **numbers}


def _conservation(spec: MethodSpec, ctx: MethodContext, params: Mapping[str, Any], attribution: torch.Tensor,
                  index: int, unsupported: str | None, threshold: float | None) -> dict[str, Any]:
    """``|sum(map) - F(x)| / |F(x)|`` for methods that redistribute the score itself (LRP, FullGrad)."""
    if params.get("postprocess", "none") != "none":
        return _undefined(f"postprocess: {params['postprocess']} rescales the terms, so the map no longer sums "
                          "to the score; run with postprocess: none to check it")
    total = ctx.extra.get("attribution_sum")
    total = float(total[index]) if total is not None else float(attribution.double().sum())
    tapped = (ctx.extra.get("tapped_scores") or {}).get(("input", index))
    if tapped is not None:
        f_x = float(tapped[ctx.target])
    else:
        with torch.no_grad():
            f_x = float(ctx.score_model(ctx.inputs[index:index + 1])[0, ctx.target].double())
    numbers = {"F_input": f_x, "F_baseline": 0.0, "attribution_sum": total}
    if not (math.isfinite(total) and math.isfinite(f_x)):
        return {**_undefined("the map or the score is not finite"), **numbers}
    if abs(f_x) <= 1e-12:
        return {**_undefined("the score is 0: there is nothing to conserve"), **numbers}
    error = abs(total - f_x) / abs(f_x)
    limit = THRESHOLDS["conservation"] if threshold is None else threshold
    if error <= limit:
        return {"completeness_error": error, "axiom_status": "ok", "axiom_note": unsupported or "", **numbers}
    note = (f"the map sums to {total:.4g} but the score F(x) = {f_x:.4g} ({100 * error:.0f}% off, "
            f"limit {100 * limit:.0f}%)")
    return {"completeness_error": error, "axiom_status": "warning",
            "axiom_note": f"{note}; fix: {_fix(spec, params, unsupported)}", **numbers}
