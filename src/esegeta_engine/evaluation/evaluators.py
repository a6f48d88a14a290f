"""Glue between the run config and the metric modules.

:func:`make_evaluators` turns ``config.evaluation`` into evaluators that the
execution step runs after each job, in the job's worker thread (so they can be
cancelled and count model evaluations like the method itself).
:func:`run_randomisation_phase` is the separate phase that re-runs methods on
randomised copies of the model after all maps are written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from typing import Any

import numpy as np
import torch

from esegeta_engine.config import EvaluationConfig, MethodConfig
from esegeta_engine.evaluation.costs import ScoredMap, score_cost
from esegeta_engine.explain import Evaluator, Explainer, Job, Progress, build_target
from esegeta_engine.io import Volume
from esegeta_engine.methods import MethodContext, get_method
from esegeta_engine.forward.scoring import ScoreModel

CURVES_KEY = "_curves"


def _input_grid(attribution: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """A map shaped like ``inputs``: single-channel maps are shared by all input channels."""
    if attribution.shape == inputs.shape:
        return attribution
    if attribution.dim() == inputs.dim() and attribution.shape[1] == 1:
        return attribution.expand_as(inputs) / inputs.shape[1]
    raise ValueError(f"map of shape {tuple(attribution.shape)} is not on the input grid "
                     f"{tuple(inputs.shape)}")


def make_evaluators(cfg: EvaluationConfig, seed: int = 0) -> list[Evaluator]:
    """Evaluators for the per-map metrics switched on in ``cfg``."""
    from esegeta_engine.evaluation.faithfulness import faithfulness_curves
    from esegeta_engine.evaluation.metrics import infidelity_score, sensitivity_score

    evaluators: list[Evaluator] = []
    if cfg.axioms is not None:
        evaluators.append(axiom_evaluator(cfg.axioms.threshold))
    if cfg.infidelity is not None:
        c = cfg.infidelity

        def infidelity(job: Job, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
            value = infidelity_score(ctx.score_model, ctx.inputs, _input_grid(attr, ctx.inputs), ctx.target,
                                     n_perturb_samples=c.n_perturb_samples, noise_scale=c.noise_scale,
                                     max_examples_per_batch=c.max_examples_per_batch, seed=seed)
            return {"infidelity": value}

        evaluators.append(infidelity)
    if cfg.sensitivity is not None:
        s = cfg.sensitivity

        def sensitivity(job: Job, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
            notes: list[str] = []
            value = sensitivity_score(job.spec, ctx, job.params, n_perturb_samples=s.n_perturb_samples,
                                      perturb_radius=s.perturb_radius,
                                      max_examples_per_batch=s.max_examples_per_batch, seed=seed,
                                      noise_tunnel=job.noise_tunnel, notes=notes)
            out: dict[str, Any] = {"sensitivity": value}
            if notes:
                out["sensitivity_note"] = "; ".join(notes)
            return out

        evaluators.append(sensitivity)
    if cfg.faithfulness is not None:
        f = cfg.faithfulness

        def faithfulness(job: Job, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
            curves = faithfulness_curves(ctx.score_model, ctx.inputs, attr, ctx.target, steps=f.steps,
                                         baseline=f.baseline, batch_size=f.batch_size, seed=seed,
                                         prepare_target=False)
            return {"auc_deletion": curves.auc_deletion, "auc_insertion": curves.auc_insertion,
                    "aopc_deletion": curves.aopc_deletion, CURVES_KEY: curves.to_dict()}

        evaluators.append(faithfulness)
    if cfg.class_contrast is not None:
        cc = cfg.class_contrast

        def class_contrast(job: Job, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
            from esegeta_engine.evaluation.contrast import class_contrast as check

            return check(job.spec, ctx, job.params, attr, other=cc.other_class, threshold=cc.threshold,
                         noise_tunnel=job.noise_tunnel)

        evaluators.append(class_contrast)
    from esegeta_engine.evaluation.standard import standard_evaluators

    evaluators += standard_evaluators(cfg, seed)  # ROAD, region perturbation, MPRT, stability
    return [_maps_only(e) for e in evaluators]


def _maps_only(evaluator: Evaluator) -> Evaluator:
    """Skip feature-visualisation jobs: their volumes are not attribution maps to score."""
    def wrapped(job: Job, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
        return evaluator(job, ctx, attr) if job.spec.evaluable else {}

    wrapped.__name__ = getattr(evaluator, "__name__", "metric")
    return wrapped


def axiom_evaluator(threshold: float | None = None) -> Evaluator:
    """The completeness check (:mod:`~esegeta_engine.evaluation.axioms`) as an evaluator."""
    from esegeta_engine.evaluation.axioms import completeness_check

    def axioms(job: Job, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
        return completeness_check(job.spec, ctx, job.params, attr, noise_tunnel=bool(job.noise_tunnel),
                                  threshold=threshold)

    return axioms


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The table-ready part of an evaluator result (no curves; NaN as None)."""
    out = {}
    for k, v in metrics.items():
        if k == CURVES_KEY or k.startswith("_"):  # curves, maps (a stability spread): not table values
            continue
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


def run_randomisation_phase(
    explainer: Explainer,
    volumes: Sequence[Volume],
    methods: Sequence[MethodConfig],
    cfg: EvaluationConfig,
    classes_of: Callable[[int], list[tuple[int, str]]],
    *,
    roi_mask: np.ndarray | None = None,
    cancel: Any = None,
) -> Generator[Progress, None, list[tuple[int, int, str, Any]]]:
    """Run the randomisation check per volume and class; yields progress.

    Returns ``[(volume index, class, class label, RandomisationResult), ...]``
    for every mode asked for (``both`` runs cascading then independent).
    """
    from esegeta_engine.evaluation.randomisation import run_randomisation

    r = cfg.randomisation
    assert r is not None
    chosen = [m for m in methods if r.methods is None or m.name in r.methods]
    chosen = [m for m in chosen if not get_method(m.name).needs_batch
              and get_method(m.name).evaluable]
    entries = [(get_method(m.name), get_method(m.name).resolve_params(m.params), layer)
               for m in chosen for layer in (m.layers or [None])]
    modes = ["cascading", "independent"] if r.mode == "both" else [r.mode]
    results = []
    for vi, volume in enumerate(volumes):
        x = explainer.prepare_input(volume)
        target = build_target(explainer.target, explainer.preprocess.spatial_dims, roi_mask,
                              explainer.preprocess.axis_order, explainer.geometry(volume),
                              tuple(volume.data.shape[:explainer.preprocess.spatial_dims])).to(explainer.device)
        out = explainer.raw_output(x)
        target.prepare(out)
        target = explainer.expand_target(target, out, volume)  # component columns, as the maps had
        for cls, label in classes_of(vi):
            for mode in modes:
                messages: list[Progress] = []

                def progress(done: int, total: int, message: str) -> None:
                    messages.append(Progress(done, total, f"randomisation ({mode}) {label}: {message}"))

                built: list[ScoreModel] = []

                def build(model_copy: torch.nn.Module, x: torch.Tensor = x) -> ScoreModel:
                    # the one factory: randomised copies run as the model does (sliding window, precision)
                    built.append(explainer.make_score_model(target, x, model=model_copy))
                    return built[-1]

                yield Progress(0, 1, f"randomisation ({mode}) · {label}: starting")
                result = run_randomisation(explainer.model, build, x, cls, entries, mode=mode,
                                           seed=explainer.seed, max_stages=r.max_stages,
                                           threshold=r.threshold, calibrate=r.calibrate,
                                           footprint=r.footprint, cancel=cancel, progress=progress)
                yield from messages
                result.evaluations = sum(sm.monitor.count for sm in built)  # what the estimate counts
                results.append((vi, cls, label, result))
    return results


@score_cost("randomisation", after_run=True)
def randomisation_cost(cfg: EvaluationConfig, scored: ScoredMap) -> int | None:
    """The randomisation phase's re-runs of a map's method (bare, without a noise tunnel): per
    mode, the trained model, each stage (the parameterised layers, at most ``max_stages``) and,
    calibrated, two fully randomised networks. An upper bound when some layer is never reached
    by the forward (no stage) or the method fails on the trained model (no re-runs)."""
    r = cfg.randomisation
    if r is None or (r.methods is not None and scored.method not in r.methods) \
            or (scored.method and get_method(scored.method).needs_batch):
        return 0
    stages = scored.n_stages()
    if stages is None or scored.plain_evaluations is None:
        return None
    runs = 1 + min(stages, r.max_stages or stages) + (2 if r.calibrate else 0)
    return (2 if r.mode == "both" else 1) * runs * scored.plain_evaluations
