"""``esegeta run --dry-run`` for a single run: the plan and one probed patch, nothing written.

:func:`dry_run` loads the model and the volumes, plans every job as the run would (methods ×
layers × classes per volume, with their expected model evaluations and the scores'), names each
method the execution form refuses before any work and each layer a deployed pipeline refuses a layer
method on, as the run refuses (:func:`~esegeta_engine.jobs.refusal.split_refusals`),
and times one forward + backward of one patch of the largest volume
(:func:`~esegeta_engine.jobs.probe.probe_run`: three to six network calls) to estimate the run's time and
peak memory. No prediction pass runs and no output folder is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from esegeta_engine.jobs.plan import Job, plan_jobs
from esegeta_engine.methods import get_method
from esegeta_engine.methods.registry import CostInfo

if TYPE_CHECKING:  # pragma: no cover
    from esegeta_engine.config import Config
    from esegeta_engine.jobs.probe import ProbeEstimate

__all__ = ["DryRun", "dry_run"]


@dataclass
class DryRun:
    """What a single run would do (see :func:`dry_run`).

    Attributes
    ----------
    jobs : list of (volume name, Job)
        Every planned job (classes not in the config count as one per volume, as in the estimate).
    refused : list of (volume name, method, reason)
        Methods the execution form refuses before any work, with the one-line reason (``method@layer`` for
        one layer a deployed pipeline refuses a layer method on; its other layers are planned).
    expected_evaluations : int or None
        Model evaluations of the run, its scores' included (None when a method cannot tell).
    probe : ProbeEstimate or None
        The probed patch and what it says of the largest volume's run.
    seconds : float or None
        The run's estimated time: the probe's seconds per evaluation, scaled to every volume.
    """

    jobs: list[tuple[str, Job]] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    expected_evaluations: int | None = None
    classes_note: str | None = None
    probe: ProbeEstimate | None = None
    probe_volume: str = ""
    probe_error: str | None = None
    seconds: float | None = None

    def lines(self) -> list[str]:
        """The plan as printed by ``esegeta run --dry-run``."""
        from esegeta_engine.jobs.probe import format_bytes, format_duration

        def evaluations(n: int | None) -> str:
            return f"{'?' if n is None else n} model evaluation{'' if n == 1 else 's'}"

        out = [f"plan: {len(self.jobs)} job(s), ≈ {evaluations(self.expected_evaluations)} (scores included)"]
        for name, job in self.jobs:
            out.append(f"  {name} · {job.label} · {job.cls_label}: {evaluations(job.expected_evaluations)}")
        if self.classes_note:
            out.append(f"  ({self.classes_note})")
        if self.refused:
            out.append("refused before any work:")
            out += [f"  {name} · {method}: {reason}" for name, method, reason in self.refused]
        if self.probe is not None:
            out.append(f"probe of {self.probe_volume}: {self.probe.text()}")
            when = "?" if self.seconds is None else format_duration(self.seconds)
            out.append(f"estimate for the whole run: ≈ {when} and ≈ {format_bytes(self.probe.peak_bytes)} peak")
        elif self.probe_error:
            out.append(f"probe of {self.probe_volume} failed: {self.probe_error}")
        return out


def dry_run(cfg: Config, trust_pickled: bool = False, trust_bundle: bool = False) -> DryRun:
    """Plan ``cfg`` and probe one patch; no prediction pass, nothing written.

    Raises
    ------
    EsegetaError
        What the run itself would refuse before any work (model, volumes, config).
    """
    from esegeta_engine.explain import Explainer
    from esegeta_engine.forward.runner import execution_form
    from esegeta_engine.inputs import load_inputs
    from esegeta_engine.jobs.naming import volume_stem
    from esegeta_engine.jobs.probe import probe_run
    from esegeta_engine.jobs.probe_cost import padded_voxels
    from esegeta_engine.jobs.refusal import split_refusals
    from esegeta_engine.models import Trust, load_source

    loaded = load_source(cfg.model, Trust(pickled=trust_pickled, bundle=trust_bundle))
    cfg = loaded.configure(cfg)  # a deployed pipeline's own preprocessing, as the run does
    try:
        volumes, _ = load_inputs(cfg)
    except Exception as exc:
        raise loaded.volume_error(exc) from None
    explainer = Explainer(loaded.module, cfg.preprocess, cfg.target, cfg.model.output, seed=cfg.run.seed,
                          timeout_s=cfg.run.timeout_s, execution=cfg.execution)
    p = cfg.preprocess
    plan = DryRun()
    classes = list(cfg.target.classes or [0])
    if not cfg.target.classes:
        plan.classes_note = "classes come from the prediction: counted here as one per volume"
    runnable: list[list[Any]] = []
    counts: list[int | None] = []  # each volume's evaluations (its scores' included)
    for i, v in enumerate(volumes):
        name = volume_stem(v.path, i)
        shape = tuple(explainer.geometry(v).to_model(np.empty(v.data.shape[:p.spatial_dims], bool)).shape)
        # as the run refuses: a whole method, or one layer of a layer method (its other layers run)
        ok, refused = split_refusals(cfg.methods, cfg.target.kind, cfg.execution, shape, loaded.module)
        if len(volumes) < 2:  # a batch-only method has nothing to permute with (methods.run.batch_refusal)
            from esegeta_engine.methods.run import batch_refusal

            refused += [(m.name, batch_refusal(get_method(m.name), patchwise=False)) for m in ok
                        if get_method(m.name).needs_batch]
            ok = [m for m in ok if not get_method(m.name).needs_batch]
        plan.refused += [(name, m, err.problem) for m, err in refused]
        runnable.append(ok)
        sliding = execution_form(cfg.execution, shape).sliding is not None
        single = [m for m in ok if not get_method(m.name).needs_batch]
        for job in plan_jobs(single, classes, lambda c: f"class{c}", cfg.target.kind, (i,),
                             info=CostInfo(1, p.in_channels, shape, 1, sliding), context={},
                             layer_channels=explainer._layer_channels,
                             layer_per_member=explainer._layer_per_member):
            plan.jobs.append((name, job))
        counts.append(explainer.estimate([v], single, cfg.evaluation) if single else 0)
    voxels = [math.prod(v.data.shape[:p.spatial_dims]) for v in volumes]
    batched = [m for m in runnable[0] if get_method(m.name).needs_batch and all(m in r for r in runnable)]
    extra = explainer.estimate(volumes, batched, cfg.evaluation) if batched else 0  # one job over all volumes
    if batched:
        shape = tuple(explainer.geometry(volumes[0]).to_model(
            np.empty(volumes[0].data.shape[:p.spatial_dims], bool)).shape)
        plan.jobs += [("all volumes", job) for job in plan_jobs(
            batched, classes, lambda c: f"class{c}", cfg.target.kind, tuple(range(len(volumes))),
            info=CostInfo(len(volumes), p.in_channels, shape), context={}, layer_channels=explainer._layer_channels)]
    known = None not in counts and extra is not None
    plan.expected_evaluations = sum(counts) + extra if known else None  # type: ignore[arg-type,operator]
    big = int(np.argmax(voxels))
    plan.probe_volume = volume_stem(volumes[big].path, big)
    if runnable[big]:
        try:
            plan.probe = probe_run(explainer, volumes[big], runnable[big])
        except Exception as exc:  # the run would fail here too: said in one line, not a traceback
            plan.probe_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if plan.probe is not None and plan.probe.expected_evaluations and known:
            probe = plan.probe

            def volume_seconds(n: int, vox: int, shape: tuple[int, ...]) -> float:  # prediction + n evaluations
                if probe.evaluation_line is not None and probe.prediction_line is not None:  # whole volume
                    vox = padded_voxels(shape, probe.divisible_by)  # as the network sees it (the probe's line too)
                    return probe.prediction_line.at(vox) + n * probe.evaluation_line.at(vox)
                return (probe.prediction_seconds + n * probe.evaluation_seconds) * vox / voxels[big]

            shapes = [tuple(v.data.shape[:p.spatial_dims]) for v in volumes]
            plan.seconds = sum(volume_seconds(n, vox, shape) for n, vox, shape in zip(counts, voxels, shapes)) \
                + extra * probe.evaluation_seconds  # type: ignore[operator]
    return plan
