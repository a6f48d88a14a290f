"""The field's standard scores and the stability check as per-map evaluators.

:func:`standard_evaluators` turns ``evaluation.road``, ``region_perturbation``, ``mprt`` and
``stability`` into evaluators the execution step runs after each job, on the job's own score
model (so sliding-window maps are scored patch-wise, with the perturbation reuse), each adding
how many model evaluations it made (``<name>_evaluations``). :func:`metric_cost` gives those
numbers before a run (the plan's estimate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta_engine.config import EvaluationConfig
from esegeta_engine.methods import MethodContext, attribute

__all__ = ["explain_with", "metric_cost", "standard_evaluators"]

STABILITY_MAP = "_stability_std"


def explain_with(job: Any, ctx: MethodContext, model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The job's method on ``model`` (a copy or a member) for ``x``: ``(N, *spatial)``, channels summed.

    The score model is built by the one factory with the job's target, output selection,
    monitor and execution form.
    """
    from esegeta_engine.models import get_layer
    from esegeta_engine.forward.scoring import make_score_model

    sm0 = ctx.score_model
    sm = make_score_model(model, sm0.target, output=sm0.net.output, monitor=sm0.monitor, form=sm0.form)
    sub = MethodContext(score_model=sm, inputs=x, target=ctx.target,
                        layer=get_layer(model, job.layer) if job.layer else None, layer_name=job.layer,
                        seed=ctx.seed, torchscript=ctx.torchscript, extra={"patchwise": sm.patchwise, "notes": []})
    r = attribute(job.spec, sub, job.params, job.noise_tunnel)
    return r.detach().float().sum(1).cpu().numpy()


def _counted(name: str, fn: Any) -> Any:
    def evaluator(job: Any, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
        before = ctx.score_model.monitor.count
        out = fn(job, ctx, attr)
        out[f"{name}_evaluations"] = ctx.score_model.monitor.count - before
        return out

    evaluator.__name__ = name
    return evaluator


def standard_evaluators(cfg: EvaluationConfig, seed: int = 0,
                        members: Sequence[nn.Module] | None = None) -> list[Any]:
    """Evaluators for ROAD, region perturbation, MPRT and stability as configured in ``cfg``.

    ``members``: models explained beside the run's model for the stability check (a model
    list); without them ``stability.over`` picks the model's folds, mirrors or other members,
    or input noise (:func:`stability.choose_members`).
    """
    from esegeta_engine.evaluation import mprt, road, stability

    out = []
    if cfg.road is not None:
        c = cfg.road

        def road_(job: Any, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
            r = road.road(ctx.score_model, ctx.inputs, attr, ctx.target, percentages=c.percentages, noise=c.noise,
                          seed=seed, batch_size=c.batch_size)
            return {k: r[k] for k in ("road_morf", "road_lerf")}

        out.append(_counted("road", road_))
    if cfg.region_perturbation is not None:
        c2 = cfg.region_perturbation

        def region(job: Any, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
            r = road.region_perturbation(ctx.score_model, ctx.inputs, attr, ctx.target, region=c2.region,
                                         steps=c2.steps, perturbation=c2.perturbation, seed=seed,
                                         batch_size=c2.batch_size)
            return {"region_aopc": r["region_aopc"]}

        out.append(_counted("region_perturbation", region))
    if cfg.mprt is not None:
        c3 = cfg.mprt

        def mprt_(job: Any, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
            from esegeta_engine.evaluation.randomisation import _fully_randomised, execution_order, randomised_copies

            model = ctx.score_model.net.model
            x = ctx.inputs
            order = execution_order(model, x)

            def explain(m: nn.Module, xi: torch.Tensor) -> np.ndarray:
                return explain_with(job, ctx, m, xi)

            if c3.variant == "efficient":
                r = mprt.efficient_mprt(explain, model, _fully_randomised(model, order, seed), x, n_bins=c3.n_bins)
                return {k: r[k] for k in ("mprt_efficient", "mprt_entropy_original", "mprt_entropy_randomised")}
            stages = ((name, copy) for _, name, copy in
                      randomised_copies(model, order, "cascading", seed, max_stages=c3.max_stages))
            r = mprt.smooth_mprt(explain, model, stages, x, samples=c3.samples, noise=c3.noise, seed=seed)
            return {"mprt_smooth": r["mprt_smooth"]}

        out.append(_counted("mprt", mprt_))
    if cfg.stability is not None:
        c4 = cfg.stability

        loaded: list[nn.Module] = list(members or [])

        def stability_(job: Any, ctx: MethodContext, attr: torch.Tensor) -> dict[str, Any]:
            model = ctx.score_model.net.model
            if c4.models and not loaded:  # the configured model list, loaded once
                from esegeta_engine.models import load_model

                loaded.extend(load_model(p, device=str(ctx.inputs.device)) for p in c4.models)
            over, group = stability.choose_members(model, c4.over, loaded)
            res = stability.stability(lambda m, xi: explain_with(job, ctx, m, xi), model, ctx.inputs, group,
                                      samples=c4.samples, noise=c4.noise, seed=seed)
            res["stability_over"] = over  # folds, mirrors, models, members or noise
            if group:
                res["stability_members"] = "; ".join(stability.member_names(group))
            return res

        out.append(_counted("stability", stability_))
    return out


def metric_cost(cfg: EvaluationConfig, method_evaluations: int | None, *, n_members: int | None = None,
                n_stages: int | None = None, model: nn.Module | None = None) -> int | None:
    """Model evaluations the per-map scores add to one map (``None`` when unknown in advance).

    The sum of the scores' registered costs (:mod:`.costs`) without the randomisation phase.
    ``method_evaluations``: the method's own count (re-run by MPRT and stability);
    ``n_members``: ensemble members (stability); ``n_stages``: randomisation stages (smooth
    MPRT); ``model``: asked for either when not given.
    """
    from esegeta_engine.evaluation.costs import ScoredMap, map_score_cost

    scored = ScoredMap("", None, method_evaluations, model, members=n_members, stages=n_stages)
    return map_score_cost(cfg, scored, after_run=False)
