"""What the scores cost, in model evaluations, known before a run (for the plan's run total).

Each score registers its cost function beside itself with :func:`score_cost` (ROAD and region
perturbation in :mod:`.road`, MPRT in :mod:`.mprt`, stability in :mod:`.stability`, the energy
pointing game in :mod:`.pointing`, the randomisation phase in :mod:`.evaluators`). A cost
function gets the evaluation config and a :class:`ScoredMap` (one map to be scored: its method,
what one re-run of that method costs, the model) and returns the model evaluations the score
adds to that map: 0 when its config section is off, ``None`` when it cannot tell in advance.
:func:`jobs_score_cost` sums them over planned jobs; :func:`esegeta_engine.jobs.plan.estimate_run`
adds that sum to the methods' own.

What is counted is what the run's evaluation monitor counts (the ``<score>_evaluations`` of each
map, the randomisation phase's ``evaluations``); the prediction pass that freezes a target and
the hook pass that finds the layers' data-flow order are counted by neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["AFTER_RUN", "SCORE_COSTS", "ScoredMap", "counted_evaluations", "evaluations_line", "jobs_score_cost", "map_score_cost", "parameterised_layers",
           "score_cost"]


@dataclass
class ScoredMap:
    """One map about to be scored, as a score's cost function sees it.

    Attributes
    ----------
    method : str
        The method's registry name.
    layer : str or None
        Its layer (layer methods).
    method_evaluations : int or None
        Model evaluations of one re-run of the method on one input (MPRT and stability re-run it).
    model : nn.Module or None
        The explained model (ensemble members, parameterised layers); ``None`` when not known.
    plain_evaluations : int or None
        One re-run without the noise tunnel (the randomisation check runs the bare method);
        default ``method_evaluations``.
    members, stages : int, optional
        Known ensemble members / randomisation stages (instead of asking ``model``).
    """

    method: str
    layer: str | None
    method_evaluations: int | None
    model: nn.Module | None = None
    plain_evaluations: int | None = None
    members: int | None = None
    stages: int | None = None

    def __post_init__(self) -> None:
        if self.plain_evaluations is None:
            self.plain_evaluations = self.method_evaluations

    def n_members(self, cfg: Any) -> int | None:
        """Maps the stability check (``cfg``: its config section) makes over members, as
        :func:`~esegeta_engine.evaluation.stability.choose_members` picks them; ``None``: over
        input noise (``samples`` maps); 0: the members asked for do not exist (the check fails
        before any evaluation)."""
        from esegeta_engine.errors import MethodError
        from esegeta_engine.evaluation.stability import choose_members

        if cfg.over == "noise":
            return None
        if cfg.models:
            return 1 + len(cfg.models)
        if self.members is not None:
            return self.members
        if self.model is None:
            return None
        try:
            _, found = choose_members(self.model, cfg.over)
        except MethodError:
            return 0
        return len(found) if found else None

    def n_stages(self) -> int | None:
        """Randomisation stages: the model's parameterised layers (:func:`parameterised_layers`)."""
        if self.stages is not None:
            return self.stages
        return None if self.model is None else parameterised_layers(self.model)


ScoreCost = Callable[[Any, ScoredMap], "int | None"]
SCORE_COSTS: dict[str, ScoreCost] = {}
"""``score name -> cost(evaluation config, scored map)``, filled by :func:`score_cost`."""
AFTER_RUN: set[str] = set()
"""Scores run as a phase after every map is written (the randomisation check), not inside the job."""


def score_cost(name: str, *, after_run: bool = False) -> Callable[[ScoreCost], ScoreCost]:
    """Register ``fn`` as the cost of score ``name`` (a decorator, used beside the score).

    ``after_run``: the score runs in its own phase after the maps (its evaluations are not
    part of a map's ``metric_evaluations``).
    """
    def register(fn: ScoreCost) -> ScoreCost:
        SCORE_COSTS[name] = fn
        if after_run:
            AFTER_RUN.add(name)
        return fn

    return register


def parameterised_layers(model: nn.Module) -> int:
    """Modules owning parameters directly: the randomisation stages of a model whose every such
    module is reached by its forward (an upper bound otherwise: unreached ones are no stage)."""
    return sum(1 for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False)))


def _registered() -> dict[str, ScoreCost]:
    import importlib

    for module in ("road", "mprt", "stability", "pointing", "evaluators"):  # they register their costs on import
        importlib.import_module(f"esegeta_engine.evaluation.{module}")
    return SCORE_COSTS


def map_score_cost(cfg: Any, scored: ScoredMap, *, after_run: bool = True) -> int | None:
    """Model evaluations every configured score adds to one map (``None`` when one cannot tell).

    ``after_run=False`` leaves out the phases after the run (the scores made inside the job only).
    """
    total = 0
    for name, fn in _registered().items():
        if name in AFTER_RUN and not after_run:
            continue
        n = fn(cfg, scored)
        if n is None:
            return None
        total += int(n)
    return total


def jobs_score_cost(cfg: Any, jobs: Sequence[Any], model: nn.Module | None,
                    rerun: Callable[[Any, bool], int | None] | None = None) -> int | None:
    """Model evaluations the scores add to the maps of planned ``jobs`` (one map per job and volume).

    ``rerun(job, noise_tunnel)``: one re-run of the job's method on one input, with or without
    its noise tunnel (default: the job's own expected evaluations, right for single-volume jobs
    without one). Jobs whose method makes no attribution map (feature visualisation) are not
    scored and cost nothing.
    """
    if cfg is None:
        return 0
    total = 0
    for job in jobs:
        if not job.spec.evaluable:
            continue
        once = rerun(job, True) if rerun is not None else job.expected_evaluations
        plain = rerun(job, False) if rerun is not None else job.expected_evaluations
        n = map_score_cost(cfg, ScoredMap(job.spec.name, job.layer, once, model, plain))
        if n is None:
            return None
        total += n * len(job.volumes)
    return total


def counted_evaluations(manifest: dict[str, Any]) -> int:
    """Model evaluations a run's folder counted, as its estimate counts them: every map's method
    (``model_evaluations``) and scores (``metric_evaluations``), and the randomisation phase."""
    total = 0
    for rec in manifest.get("results") or []:
        total += int(rec.get("model_evaluations") or 0) + int(rec.get("metric_evaluations") or 0)
    return total + sum(int(e.get("evaluations") or 0) for e in manifest.get("randomisation") or [])


def evaluations_line(manifest_path: Any) -> str | None:
    """The CLI summary's line: the run's model evaluations (methods and scores) and its estimate."""
    import json

    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    counted, est = manifest.get("model_evaluations"), manifest.get("estimated_model_evaluations")
    if counted is None:
        return None
    return (f"model evaluations (methods and scores): {counted}"
            + (f", estimated {est} before the run" if est is not None else "") + "\n")
