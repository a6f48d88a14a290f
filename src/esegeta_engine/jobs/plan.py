"""Planning: (methods × layers × classes) for a volume -> jobs with stable keys and costs.

Planning is pure: it evaluates no model. A job's key is a SHA-256 over everything that
determines its map — method, resolved parameters, layer, noise tunnel, class, target,
preprocessing, execution form, seed, the volume's content and the model's weights — so
a resumed run can tell a finished, matching output from one made with other settings,
and two jobs that differ in any of these never share an output name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodSpec, get_method
from esegeta_engine.methods.registry import CostInfo


@dataclass
class Job:
    """One attribution to compute: a method (and layer) for one class of some volumes.

    Attributes
    ----------
    key : str
        Stable SHA-256 (hex) of everything that determines the map ('' if unplanned).
    expected_evaluations : int or None
        Model evaluations the method will make (None when unknown in advance).
    """

    spec: MethodSpec
    params: dict[str, Any]
    cls: int
    cls_label: str
    volumes: tuple[int, ...]
    layer: str | None = None
    noise_tunnel: dict[str, Any] | None = None
    key: str = ""
    expected_evaluations: int | None = None
    details: dict[str, Any] | None = None  # what the target column is (a component's class, size, centroid)
    # a deployed pipeline's network evaluations (patches x mirrors x folds) of the method's forward calls
    network_evaluations: int | None = None

    @property
    def label(self) -> str:
        """``method[@layer][+smoothgrad]`` for names and messages."""
        text = self.spec.name + (f"@{self.layer}" if self.layer else "")
        return text + (f"+{self.noise_tunnel['type']}" if self.noise_tunnel else "")


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return repr(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def digest(*parts: Any) -> str:
    """SHA-256 (hex) of a canonical JSON of ``parts``."""
    text = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def array_fingerprint(array: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and bytes (a volume's content)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{a.shape}|{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(memoryview(t.detach().cpu().contiguous().numpy().reshape(-1)).cast("B")
                 if t.dtype not in (torch.bfloat16,) else t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


KEY_VERSION = 2
"""Version of the key scheme, recorded in every manifest. Version 2 (one key for single runs and
cohorts): the target without its class list and ROI path (the class and the ROI's content are
their own parts), the model's weights and the volumes' content. A folder written with another
version is resumed by redoing its jobs, never by reusing a map under a key it was not made for."""


SCHEDULING = ("executor", "devices", "workers", "scheduler", "connect_timeout_s")
"""Execution settings that say where jobs run, not what they compute: never part of a key."""


def key_context(target: Mapping[str, Any], preprocess: Mapping[str, Any], execution: Mapping[str, Any] | None,
                output: int | str | None, seed: int, model_key: str, volume_keys: Sequence[str],
                roi_key: str | None = None) -> dict[str, Any]:
    """Everything a job's map depends on besides the method: part of every job key.

    Single runs (:meth:`~esegeta_engine.explain.Explainer.job_context`) and cohorts
    (:func:`~esegeta_engine.cohort.plan.plan_cohort`) build it here, so identical work
    gets one key whichever of them plans it.

    Parameters
    ----------
    target, preprocess, execution : mapping
        The config sections as JSON (``model_dump(mode="json")``); the target's ``classes``
        and ``roi_mask`` path are left out (the class is the job's own; the ROI counts by content),
        and so are the execution's :data:`SCHEDULING` settings (a map made by one executor is
        reused by another).
    output : int, str or None
        The model output selection.
    seed : int
        The run's seed.
    model_key : str
        :func:`model_fingerprint` of the model.
    volume_keys : sequence of str
        :func:`array_fingerprint` of each volume the job explains.
    roi_key : str, optional
        :func:`array_fingerprint` of the ROI mask of an ``roi`` target.
    """
    target = {k: v for k, v in target.items() if k not in ("classes", "roi_mask")}
    return {"target": target, "preprocess": dict(preprocess),
            "execution": None if execution is None else {k: v for k, v in execution.items()
                                                         if k not in SCHEDULING},
            "output": output, "seed": seed, "model": model_key, "volumes": list(volume_keys), "roi": roi_key}


def job_key(method: str, params: Mapping[str, Any], layer: str | None, noise_tunnel: Mapping[str, Any] | None,
            cls: int, context: Mapping[str, Any]) -> str:
    """The one key of a job: SHA-256 of the method, its resolved parameters, layer, noise
    tunnel, class and :func:`key_context` (64 hex digits)."""
    return digest(method, dict(params), layer, None if noise_tunnel is None else dict(noise_tunnel), cls,
                  dict(context))


def expected_evaluations(spec: MethodSpec, params: Mapping[str, Any], info: CostInfo) -> int | None:
    """Model evaluations ``spec`` makes with ``params`` on inputs described by ``info``."""
    if spec.cost is None:
        return None
    try:
        return int(spec.cost(info, params))
    except Exception:  # a cost function that cannot tell: unknown, never a failed run
        return None


def total_evaluations(jobs: Sequence[Job]) -> int | None:
    """Model evaluations of ``jobs`` together (None when one of them cannot tell in advance)."""
    if any(j.expected_evaluations is None for j in jobs):
        return None
    return sum(int(j.expected_evaluations or 0) for j in jobs)


def plan_jobs(methods: Sequence[Any], classes: Sequence[int], class_label: Any, target_kind: str,
              volumes: tuple[int, ...], *, info: CostInfo, context: Mapping[str, Any],
              layer_channels: Any = None, layer_per_member: Any = None) -> list[Job]:
    """Expand methods × layers × classes into keyed jobs (pure: no model evaluation).

    Parameters
    ----------
    methods : sequence of MethodConfig
        Methods with parameters, layers and noise tunnel.
    classes : sequence of int
        Score indices to explain.
    class_label : callable
        ``class_label(index) -> str`` (the target's label of a class).
    target_kind : str
        The target kind, for labels.
    volumes : tuple of int
        Indices of the volumes these jobs explain together.
    info : CostInfo
        Input description for the cost estimates.
    context : mapping
        Everything else the maps depend on (target, preprocessing and execution
        config, seed, volume and model fingerprints): part of every key.
    layer_channels : callable, optional
        ``layer_channels(name) -> int | None``: output channels of a layer (costs of
        methods that evaluate once per channel).
    """
    jobs = []
    for m in methods:
        spec = get_method(m.name)
        params = spec.resolve_params(m.params)
        nt = m.noise_tunnel.model_dump() if m.noise_tunnel else None
        nt_samples = int(nt["samples"]) if nt else 1
        # a method that explains no class (feature visualisation): one volume per layer
        chosen = classes if spec.explains_class else list(classes)[:1]
        for layer in m.layers or [None]:
            channels = layer_channels(layer) if layer and layer_channels is not None else None
            per_member = bool(layer and layer_per_member is not None and layer_per_member(layer))
            job_info = CostInfo(info.batch, info.channels, info.spatial, nt_samples, info.patchwise,
                                layer_channels=channels, layer_per_member=per_member)
            for c in chosen:
                label = f"{target_kind}-{class_label(c)}"
                if not spec.explains_class:  # named by what it shows, not by a target
                    label = "volume" + (f"-ch{params['channel']}" if "channel" in params else "")
                key = job_key(spec.name, params, layer, nt, c, context)
                jobs.append(Job(spec, params, c, label, volumes, layer, nt, key,
                                expected_evaluations(spec, params, job_info)))
    return jobs


def job_estimate(evaluation: Any, job: Job, *, model: Any = None) -> int | None:
    """What :func:`estimate_run` counts for one planned job: its method's evaluations and, with
    ``evaluation`` (an ``EvaluationConfig``), its maps' scores (``None`` when unknown)."""
    if evaluation is None or job.expected_evaluations is None:
        return job.expected_evaluations
    from esegeta_engine.evaluation.costs import jobs_score_cost

    scores = jobs_score_cost(evaluation, [job], model)
    return None if scores is None else job.expected_evaluations + scores


def estimate_run(explainer: Any, volumes: Sequence[Any], methods: Sequence[Any],
                 evaluation: Any = None) -> int | None:
    """Expected model evaluations of a run of ``explainer`` on ``volumes``, before any input is prepared.

    The planner's own estimate (:func:`plan_jobs` per volume; batch-only methods as one job over
    all volumes). Classes not given in the config count as one per volume. ``None`` when a
    method cannot tell its cost in advance. ``evaluation`` (an ``EvaluationConfig``): the scores'
    evaluations are added, each score's registered cost per map
    (:func:`esegeta_engine.evaluation.costs.jobs_score_cost`).
    """
    from esegeta_engine.forward.runner import execution_form
    from esegeta_engine.jobs.refusal import split_refusals

    p = explainer.preprocess
    classes = list(explainer.target.classes or [0])

    def model_shape(v: Any) -> tuple[int, ...]:
        return tuple(explainer.geometry(v).to_model(np.empty(v.data.shape[:p.spatial_dims], bool)).shape)

    def cost(ms: Sequence[Any], group: tuple[int, ...], info: CostInfo) -> int | None:
        jobs = plan_jobs(ms, classes, str, explainer.target.kind, group, info=info, context={},
                         layer_channels=explainer._layer_channels, layer_per_member=explainer._layer_per_member)
        n = total_evaluations(jobs)
        if n is None or evaluation is None:
            return n
        from esegeta_engine.evaluation.costs import jobs_score_cost

        def rerun(job: Job, tunnel: bool) -> int | None:  # the job's method once, on one input
            nt = int(job.noise_tunnel["samples"]) if tunnel and job.noise_tunnel else 1
            channels = explainer._layer_channels(job.layer) if job.layer else None
            per_member = bool(job.layer and explainer._layer_per_member(job.layer))
            return expected_evaluations(job.spec, job.params, CostInfo(1, info.channels, info.spatial, nt,
                                                                       info.patchwise, layer_channels=channels,
                                                                       layer_per_member=per_member))

        scores = jobs_score_cost(evaluation, jobs, explainer.model, rerun)
        return None if scores is None else n + scores

    single = [m for m in methods if not get_method(m.name).needs_batch]
    batched = [m for m in methods if get_method(m.name).needs_batch]
    total = 0
    for i, v in enumerate(volumes):
        shape = model_shape(v)
        sliding = execution_form(explainer.execution, shape, explainer._divisible).sliding is not None
        # what the run refuses before any work (a method, or one layer of a layer method) costs nothing
        runs, _ = split_refusals(single, explainer.target.kind, explainer.execution, shape, explainer.model)
        n = cost(runs, (i,), CostInfo(1, p.in_channels, shape, 1, sliding))
        if n is None:
            return None
        total += n
    if batched and len(volumes) > 1:  # batch-only methods explain every volume in one job (one volume: refused)
        shape = model_shape(volumes[0])
        batched, _ = split_refusals(batched, explainer.target.kind, explainer.execution, shape, explainer.model)
    if batched and len(volumes) > 1:
        n = cost(batched, tuple(range(len(volumes))), CostInfo(len(volumes), p.in_channels, shape))
        if n is None:
            return None
        total += n
    return total


def volume_groups(shapes: Sequence[tuple[int, ...]], methods: Sequence[Any]) -> list[tuple[tuple[int, ...], list]]:
    """Which volumes each method runs on at once: ``[(volume indices, methods), ...]``.

    Methods that only mean something over a batch (feature permutation) get all volumes
    stacked; everything else runs one volume at a time, which keeps every Captum batch
    expansion aligned with the target's frozen regions.

    Raises
    ------
    MethodError
        A batch method with volumes of different shapes.
    """
    batched = [m for m in methods if get_method(m.name).needs_batch]
    single = [m for m in methods if not get_method(m.name).needs_batch]
    groups: list[tuple[tuple[int, ...], list]] = [((i,), single) for i in range(len(shapes))] if single else []
    if batched:
        if len(set(map(tuple, shapes))) > 1:
            raise MethodError(f"{', '.join(m.name for m in batched)} needs volumes of one shape",
                              "resample or crop the volumes to a common grid")
        groups.append((tuple(range(len(shapes))), batched))
    return groups


def count_network_evaluations(jobs: Sequence[Job], per_input: int, info: CostInfo) -> None:
    """Set each job's ``network_evaluations``: a deployed pipeline's network calls for its method.

    ``per_input`` is the pipeline's network calls for one input (patches x mirrored copies x folds);
    a job's method inputs are counted with one perturbation / path point per evaluation.
    """
    for job in jobs:
        ones = {k: 1 for k in ("perturbations_per_eval", "internal_batch_size") if k in job.params}
        n = expected_evaluations(job.spec, {**job.params, **ones}, info) if ones else job.expected_evaluations
        if n is not None:
            nt = int(job.noise_tunnel["samples"]) if job.noise_tunnel else 1
            job.network_evaluations = n * nt * info.batch * per_input
