"""One evaluation session for every front end: the pipeline, the napari Evaluate tab, ``esegeta evaluate``.

A session holds a model and its settings (preprocessing, output selection, seed), an
:class:`~esegeta_engine.config.EvaluationConfig`, a cancel event and a progress callback.
It scores maps that already exist (:meth:`EvaluationSession.score`), re-runs methods on
randomised copies of the model (:meth:`EvaluationSession.randomise`), and hands the
pipeline the evaluators it runs after each job (:meth:`EvaluationSession.evaluators`).

Every map is evaluated on **the execution it was made with** (whole volume or sliding
window, patch size, overlap, blending, precision): :class:`MapToScore` carries the
described execution from the map's record (``MapReady.execution`` / the manifest), and the
session builds its score model with the same form. A map without that record is scored on
the session's execution. So metrics describe the function the map explains, and evaluating
a sliding-window map costs the memory of one patch batch, as explaining it did.

Events (a generator; the caller drains it): :class:`~esegeta_engine.explain.Progress`,
:class:`MapScored` (one per map, as soon as its metrics are done) and
:class:`MapRandomised` (verdict and stage maps, NIfTI order). Cancel stops at the next
model evaluation (:class:`~esegeta_engine.errors.Cancelled` propagates to the caller).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from esegeta_engine.config import EvaluationConfig, ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import Cancelled
from esegeta_engine.evaluation.api import METRIC_KEYS
from esegeta_engine.explain import Evaluator, Progress
from esegeta_engine.io import Volume

__all__ = ["MapRandomised", "MapScored", "MapToScore", "EvaluationSession", "RANDOMISATION_KEYS",
           "execution_from_record", "metric_columns"]

#: Keys a randomisation verdict adds to a map's row.
RANDOMISATION_KEYS = ("randomisation", "mean_spearman_abs", "mean_similarity", "null", "margin")


def metric_columns(cfg: EvaluationConfig, localisation: bool = False) -> list[str]:
    """The metric keys ``cfg`` produces, in table order (from the engine's own key lists)."""
    from esegeta_engine.evaluation.localisation import LOCALISATION_METRICS

    cols = [k for name, keys in METRIC_KEYS.items() if getattr(cfg, name, None) is not None for k in keys]
    if localisation or cfg.localisation is not None:
        cols += list(LOCALISATION_METRICS)
    if cfg.randomisation is not None:
        cols += list(RANDOMISATION_KEYS)
    return cols


def execution_from_record(described: dict[str, Any] | None) -> ExecutionConfig | None:
    """The :class:`ExecutionConfig` that reproduces a map's recorded execution form.

    ``described`` is what :meth:`ExecutionForm.describe` wrote (``MapReady.execution``, the
    manifest's ``execution``); ``None`` or ``{}`` (not recorded) gives ``None``. A map redone in
    fp32 after a non-finite low-precision pass (``precision_fallback``) is scored in fp32.
    """
    if not described:
        return None
    precision = "fp32" if described.get("precision_fallback") else described.get("precision", "fp32")
    if described.get("mode") == "sliding_window":
        return ExecutionConfig(mode="sliding_window", patch_size=list(described["patch_size"]),
                               overlap=described.get("overlap", 0.25), blend=described.get("blend", "gaussian"),
                               sw_batch_size=described.get("sw_batch_size", 1),
                               padding=described.get("padding", "constant"), precision=precision)
    return ExecutionConfig(mode="whole", precision=precision, divisible_by=described.get("divisible_by", "auto"))


@dataclass
class MapToScore:
    """One existing map and what made it (a map record's view for the session).

    ``array`` is the map in NIfTI order on the input's grid; ``target`` gives the kind,
    activation, voxel or channel (its classes are ``[cls]``); ``execution`` is the recorded
    execution form (``None``: not recorded, the session's is used); ``roi_mask`` (NIfTI
    order) and ``roi_key`` (its name) serve ROI targets.
    """

    name: str
    method: str
    params: dict[str, Any]
    cls: int
    target: TargetConfig
    array: np.ndarray
    layer: str | None = None
    noise_tunnel: dict[str, Any] | None = None
    target_label: str = ""
    label: str = ""
    execution: dict[str, Any] | None = None
    roi_mask: np.ndarray | None = None
    roi_key: str | None = None


@dataclass
class MapScored:
    """The metrics of one map (NaN where undefined; ``notes[metric]`` says why)."""

    index: int
    metrics: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)
    curves: dict[str, Any] | None = None
    execution: dict[str, Any] = field(default_factory=dict)


@dataclass
class MapRandomised:
    """Randomisation of one map: verdict, scores and stage maps (NIfTI order)."""

    index: int
    update: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)
    stages: list[tuple[int, str, np.ndarray]] = field(default_factory=list)


class _SetupError(ValueError):
    """A map that cannot be scored (the message says why)."""


def _reason(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, _SetupError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:300]


class EvaluationSession:
    """Evaluate maps of one model (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The model the maps explain.
    config : EvaluationConfig
        Which metrics, with their settings (``localisation.mask`` is not read here: the
        caller passes the mask to :meth:`score`).
    preprocess, output, seed
        As the maps were made with.
    execution : ExecutionConfig, optional
        Used for maps whose execution is not recorded (and for the pipeline's evaluators,
        which run inside the job on the job's own score model).
    cancel : threading.Event, optional
        Set from any thread to stop at the next model evaluation.
    on_progress : callable, optional
        Called from the evaluating thread with :class:`Progress` between and within maps.
    """

    def __init__(self, model: Any, config: EvaluationConfig, *, preprocess: PreprocessConfig | None = None,
                 output: int | str | None = None, seed: int = 0, execution: ExecutionConfig | None = None,
                 cancel: threading.Event | None = None,
                 on_progress: Callable[[Progress], None] | None = None) -> None:
        self.model = model
        self.config = config
        self.preprocess = preprocess or PreprocessConfig()
        self.output = output
        self.seed = seed
        self.execution = execution
        self.cancel = cancel or threading.Event()
        self.on_progress = on_progress
        self._explainers: dict[str, Any] = {}
        self._inputs: dict[tuple[int, str], tuple[Any, Any]] = {}
        self._targets: dict[tuple[int, str, str], Any] = {}
        self.done = 0
        self.total = 0
        self._message = ""

    # -- the pipeline's seam ---------------------------------------------------------------------

    def evaluators(self) -> list[Evaluator]:
        """The per-map evaluators a run executes after each job, on the job's score model."""
        from esegeta_engine.evaluation.evaluators import make_evaluators

        return make_evaluators(self.config, self.seed)

    # -- shared set-up ---------------------------------------------------------------------------

    def explainer(self, execution: ExecutionConfig | None) -> Any:
        """The :class:`Explainer` (model, preprocessing, output) for one execution form."""
        from esegeta_engine.explain import Explainer

        key = "" if execution is None else execution.model_dump_json()
        if key not in self._explainers:
            self._explainers[key] = Explainer(self.model, preprocess=self.preprocess, output=self.output,
                                              seed=self.seed, execution=execution)
        return self._explainers[key]

    def _execution_of(self, info: MapToScore) -> ExecutionConfig | None:
        recorded = execution_from_record(info.execution)
        return recorded if info.execution else self.execution

    def _prepared(self, volume: Volume, execution: ExecutionConfig | None) -> tuple[Any, Any, Any]:
        explainer = self.explainer(execution)
        key = (id(volume), "" if execution is None else execution.model_dump_json())
        if key not in self._inputs:
            x = explainer.prepare_input(volume)
            self._inputs[key] = (x, explainer.raw_output(x, cancel=self.cancel))  # Cancel stops the prediction too
        x, raw = self._inputs[key]
        return explainer, x, raw

    def _target(self, volume: Volume, info: MapToScore, explainer: Any, x: Any, raw: Any) -> Any:
        from esegeta_engine.explain import build_target

        key = (id(volume), info.target.model_dump_json() + f"|roi={info.roi_key}", json.dumps(info.execution,
                                                                                             sort_keys=True))
        if key not in self._targets:
            p = self.preprocess
            target = build_target(info.target, p.spatial_dims, info.roi_mask, p.axis_order,
                                  explainer.geometry(volume), tuple(volume.data.shape[:p.spatial_dims]))
            target = target.to(explainer.device)
            target.prepare(raw)
            if info.target.components:  # one column per structure, as the run made them (cls is the column)
                from esegeta_engine.regions import expand_components

                target = expand_components(target, raw, info.target.classes, min_voxels=info.target.min_voxels,
                                           max_components=info.target.max_components,
                                           geometry=explainer.geometry(volume), affine=volume.affine)
            self._targets[key] = target
        return self._targets[key]

    def _report(self, message: str) -> Progress:
        self._message = message
        ev = Progress(self.done, max(self.total, 1), message)
        if self.on_progress is not None:
            self.on_progress(ev)
        return ev

    def _on_evaluation(self, n: int) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(self.done, max(self.total, 1), f"{self._message}: {n} model evaluations", n))

    # -- scoring existing maps -------------------------------------------------------------------

    def per_map_steps(self, localisation: bool = False) -> int:
        """Progress steps per scored map (one per metric family)."""
        return sum(getattr(self.config, k, None) is not None for k in METRIC_KEYS) + int(localisation)

    def score(self, volume: Volume, maps: Sequence[MapToScore],
              ground_truth: np.ndarray | None = None, *, localisation: bool | None = None,
              offset: int = 0) -> Generator[Progress | MapScored, None, None]:
        """Score ``maps`` (all explaining ``volume``) with the session's metrics.

        ``ground_truth`` (NIfTI order, the volume's grid) enables localisation; with
        ``localisation=True`` and no mask, the localisation keys are NaN with a note.
        A metric that fails for one map is NaN with the reason in ``notes``; a map that
        cannot be scored at all gets every metric NaN and a ``map`` note. Indices of the
        yielded :class:`MapScored` start at ``offset``.
        """
        from esegeta_engine.evaluation.api import evaluate_map
        from esegeta_engine.evaluation.localisation import LOCALISATION_METRICS
        from esegeta_engine.forward.scoring import EvaluationMonitor

        localisation = ground_truth is not None if localisation is None else localisation
        gt = None if ground_truth is None else np.asarray(ground_truth) != 0
        names = [k for k in METRIC_KEYS if getattr(self.config, k, None) is not None]
        monitor = EvaluationMonitor(self.cancel, self._on_evaluation)
        for i, info in enumerate(maps):
            metrics: dict[str, Any] = {}
            notes: dict[str, str] = {}
            curves = None
            execution = self._execution_of(info)
            yield self._report(f"{info.name}: " + ", ".join(names + (["localisation"] if localisation else [])))
            try:
                explainer, x, raw = self._prepared(volume, execution)
                ctx, attr, job = self._context(volume, info, explainer, x, raw, monitor)
                cfg = self.config
                if job.spec.needs_batch and cfg.sensitivity is not None:  # re-runs need the batch
                    notes["sensitivity"] = f"{info.method} needs a batch of volumes"
                    cfg = cfg.model_copy(update={"sensitivity": None})
                result = evaluate_map(job, ctx, attr, cfg, seed=self.seed, nifti_map=info.array,
                                      ground_truth=gt if localisation else None)
                metrics.update(result.metrics)
                notes.update(result.notes)
                curves = result.curves
                form = explainer.form_for(x).describe()
            except Cancelled:
                raise
            except Exception as exc:
                metrics.update({k: math.nan for name in names for k in METRIC_KEYS[name]})
                notes["map"] = _reason(exc)
                form = {}
            if localisation and gt is None:
                metrics.update({k: math.nan for k in LOCALISATION_METRICS})
                notes["localisation"] = "no ground-truth mask given"
            elif localisation and "map" in notes:
                metrics.update({k: math.nan for k in LOCALISATION_METRICS})
            self.done += len(names) + int(localisation)
            yield MapScored(offset + i, metrics, notes, curves, form)
            if self.cancel.is_set():
                raise Cancelled("cancelled by the user")

    def _context(self, volume: Volume, info: MapToScore, explainer: Any, x: Any, raw: Any,
                 monitor: Any) -> tuple[Any, Any, Any]:
        import torch

        from esegeta_engine.explain import Job
        from esegeta_engine.methods import MethodContext, get_method
        from esegeta_engine.models import get_layer, is_torchscript
        from esegeta_engine.preprocess import AxisOrder

        spec = get_method(info.method)
        if not spec.evaluable:
            raise _SetupError(f"'{info.name}' is a feature-visualisation volume, not an attribution map")
        target = self._target(volume, info, explainer, x, raw)
        attr_np = np.ascontiguousarray(AxisOrder(self.preprocess.axis_order).to_model(info.array))
        if attr_np.shape != tuple(x.shape[2:]):
            raise _SetupError(f"the map has shape {info.array.shape}, not the input's grid "
                              f"{tuple(volume.data.shape[:self.preprocess.spatial_dims])}")
        if not np.isfinite(attr_np).all():
            raise _SetupError("the map has NaN or Inf values")
        attr = torch.from_numpy(attr_np)[None, None].to(x.device, x.dtype)  # (1, 1, *spatial)
        score_model = explainer.make_score_model(target, x, monitor)
        ctx = MethodContext(score_model=score_model, inputs=x, target=info.cls, seed=self.seed,
                            layer=get_layer(self.model, info.layer) if info.layer else None,
                            layer_name=info.layer, torchscript=is_torchscript(self.model))
        job = Job(spec, dict(info.params), info.cls, info.target_label, (0,), info.layer, info.noise_tunnel)
        return ctx, attr, job

    # -- randomisation ---------------------------------------------------------------------------

    def randomise(self, volume: Volume, maps: Sequence[MapToScore], *,
                  offset: int = 0) -> Generator[Progress | MapRandomised, None, None]:
        """Re-run each map's method on randomised copies of the model (Adebayo et al. 2018).

        Maps of one class, target and execution run as one randomisation (one set of
        randomised copies for all their methods, as ``esegeta run`` does), through the
        execution each map was made with. See :mod:`.session_randomise`.
        """
        from esegeta_engine.evaluation.session_randomise import randomise

        yield from randomise(self, volume, maps, offset)
