"""Evaluating attribution layers for the Evaluate widget, as plain functions (no Qt).

What is measured is the map *in the layer*: its data (NIfTI order, the input
layer's grid) is put back into the model's axis order and scored against the
model with the target rebuilt from the layer's provenance (``metadata["esegeta"]``)
and the session (model, preprocessing, output selection). Nothing is re-run
for infidelity, faithfulness and localisation. Two metrics are about the
*method* rather than one map and must re-run it:

* sensitivity re-runs the method on perturbed inputs (Yeh et al. 2019);
* randomisation re-runs the method on randomised copies of the model
  (Adebayo et al. 2018) and compares each stage with the trained model's map;
  that recomputed original is checked against the layer (a note says so when
  they differ, e.g. after the layer was edited or for a noise-tunnel map).

:func:`evaluate_events` is a generator for napari's ``create_worker``: it
yields :class:`Progress`, :class:`RowReady` (one per map, as soon as its
metrics are done), :class:`StagesReady` (randomisation verdict and stage maps
of one map) and :class:`EvalError`; it never raises. A metric that fails for
one map is recorded as NaN with the reason (``notes``); Cancel (the event)
stops at the next model evaluation and keeps what was already yielded.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from esegeta_engine.config import PreprocessConfig, TargetConfig
from esegeta_engine.errors import Cancelled
from esegeta_engine.evaluation.api import default_settings
from esegeta_engine.explain import Progress
from esegeta_engine.io import Volume
from napari_esegeta._eval_table import (  # noqa: F401 (re-exported for the widget)
    UNDEFINED,
    format_value,
    notes_text,
    stage_layer_name,
    write_csv,
)
from napari_esegeta._model import format_error

BASELINES = ("blur", "zero", "mean", "min")
MODES = ("cascading", "independent")
#: Metric columns of the table, in order, per option.
METRIC_COLUMNS = {
    "axioms": ("completeness_error", "axiom_status"),
    "infidelity": ("infidelity",),
    "sensitivity": ("sensitivity",),
    "faithfulness": ("auc_deletion", "auc_insertion", "aopc_deletion"),
    "localisation": ("mass_inside", "rank_accuracy", "pointing_game", "roc_auc", "iou_otsu", "dice_otsu",
                     "iou_top", "dice_top"),
    "randomisation": ("randomisation", "mean_spearman_abs", "mean_similarity", "null", "margin"),
    "class_contrast": ("class_contrast_spearman", "class_contrast_status"),
}
_D = default_settings()  # the engine's defaults: `esegeta run` uses the same


@dataclass
class EvalOptions:
    """Which metrics to compute and how; the settings default to the engine's
    (:func:`esegeta_engine.evaluation.api.default_settings`), as in ``esegeta run``."""

    axioms: bool = True
    infidelity: bool = True
    sensitivity: bool = False
    faithfulness: bool = True
    localisation: bool = False
    randomisation: bool = False
    class_contrast: bool = False
    steps: int = _D["steps"]
    baseline: str = _D["baseline"]
    batch_size: int = _D["batch_size"]
    n_perturb_samples: int = _D["n_perturb_samples"]
    noise_scale: float = _D["noise_scale"]
    sensitivity_samples: int = _D["sensitivity_samples"]
    perturb_radius: float = _D["perturb_radius"]
    mode: str = _D["mode"]
    max_stages: int | None = _D["max_stages"]
    threshold: float = _D["threshold"]
    calibrate: bool = _D["calibrate"]
    footprint: bool = _D["footprint"]
    axiom_threshold: float | None = _D["axiom_threshold"]
    contrast_threshold: float = _D["contrast_threshold"]
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        """The flat settings for :func:`esegeta_engine.evaluation.api.evaluation_config`."""
        return {k: getattr(self, k) for k in _D}

    def columns(self) -> list[str]:
        """Metric columns for the chosen metrics."""
        return [c for key, cols in METRIC_COLUMNS.items() if getattr(self, key) for c in cols]


@dataclass
class MapInfo:
    """One result layer to evaluate (what its provenance says, plus its data)."""

    name: str
    method: str
    label: str
    target_label: str
    params: dict[str, Any]
    model_layer: str | None
    noise_tunnel: dict[str, Any] | None
    target: TargetConfig
    cls: int
    array: np.ndarray  # NIfTI order, the input layer's grid
    input_layer: str | None
    roi_mask: np.ndarray | None = None  # ROI targets: the Labels layer's mask (NIfTI order)
    roi_layer: str | None = None


@dataclass
class RowReady:
    """The metrics of one map (NaN where undefined; ``notes[metric]`` says why)."""

    index: int
    row: dict[str, Any]
    curves: dict[str, Any] | None = None


@dataclass
class StagesReady:
    """Randomisation of one map: verdict, scores, stage maps in NIfTI order."""

    index: int
    update: dict[str, Any]
    stages: list[tuple[int, str, np.ndarray]] = field(default_factory=list)


@dataclass
class EvalError:
    """A problem that stopped the evaluation (text has problem and fix)."""

    text: str


class EvaluationSetupError(ValueError):
    """A result layer that cannot be evaluated (message says why)."""


def map_info(layer: Any, label_layers: Mapping[str, Any] | None = None) -> MapInfo:
    """:class:`MapInfo` of a result layer from its metadata.

    ``label_layers`` (name -> Labels layer) supplies the ROI of ROI-target maps.

    Raises
    ------
    EvaluationSetupError
        If the provenance lacks what is needed to rebuild the target.
    """
    meta = (getattr(layer, "metadata", None) or {}).get("esegeta", {})
    if "method" not in meta:
        raise EvaluationSetupError(f"'{layer.name}' is not an attribution layer (no method in its metadata)")
    if meta.get("evaluable", True) is False:
        raise EvaluationSetupError(f"'{layer.name}' is a feature-visualisation volume, not an "
                                   "attribution map: trust metrics do not apply")
    kind = meta.get("target")
    cls = meta.get("class")
    if kind is None or cls is None:
        raise EvaluationSetupError(f"'{layer.name}' does not record its target (kind and class)")
    roi_layer, roi_mask = meta.get("roi_layer"), None
    if kind == "roi":
        found = (label_layers or {}).get(roi_layer) if roi_layer else None
        if found is None:
            raise EvaluationSetupError(f"'{layer.name}' explains the ROI drawn in Labels layer "
                                       f"'{roi_layer}', which is no longer in the viewer")
        roi_mask = np.asarray(found.data) > 0
    voxel = meta.get("voxel")
    channel = {"layer": meta.get("target_layer"), "channel": int(meta.get("channel") or 0)} \
        if kind == "channel" else {}
    try:
        target = TargetConfig(kind=kind, classes=[int(cls)], activation=meta.get("activation"),
                              voxel=[int(v) for v in voxel] if voxel else None,
                              frozen=bool(meta.get("frozen", True)), **channel)
    except Exception as exc:
        raise EvaluationSetupError(f"'{layer.name}': target cannot be rebuilt ({exc})") from None
    return MapInfo(name=layer.name, method=meta["method"], label=meta.get("label", meta["method"]),
                   target_label=meta.get("target_label", f"{kind}-{cls}"), params=dict(meta.get("params") or {}),
                   model_layer=meta.get("layer"), noise_tunnel=meta.get("noise_tunnel"), target=target,
                   cls=int(cls), array=np.asarray(layer.data, dtype=np.float32),
                   input_layer=meta.get("input_layer"), roi_mask=roi_mask, roi_layer=roi_layer)


def _to_model(arr: np.ndarray, axis_order: str) -> np.ndarray:
    from esegeta_engine.preprocess import AxisOrder

    return np.ascontiguousarray(AxisOrder(axis_order).to_model(arr))


def _to_nifti(arr: np.ndarray, axis_order: str) -> np.ndarray:
    from esegeta_engine.preprocess import AxisOrder

    return np.ascontiguousarray(AxisOrder(axis_order).to_nifti(arr)).astype(np.float32)


def _reason(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, EvaluationSetupError) else format_error(exc)
    return " ".join(text.split())[:300]


def evaluate_events(
    model: Any,
    volume: Volume,
    maps: Sequence[MapInfo],
    options: EvalOptions,
    *,
    preprocess: PreprocessConfig,
    output: int | str | None,
    ground_truth: np.ndarray | None = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> Generator[Any, None, None]:
    """Evaluate ``maps`` (all explaining ``volume``); yields events, never raises.

    Parameters
    ----------
    model, preprocess, output
        The session's model and settings (as the maps were made with).
    volume : Volume
        The input the maps explain (NIfTI order).
    maps : sequence of MapInfo
        The result layers.
    options : EvalOptions
        Metrics and their settings.
    ground_truth : np.ndarray, optional
        Mask on the volume's grid (NIfTI order) for localisation.
    cancel : threading.Event, optional
        Set from any thread to stop at the next model evaluation.
    on_progress : callable, optional
        Called from this (worker) thread with the latest :class:`Progress`.
    """
    cancel = cancel or threading.Event()
    try:
        yield from _evaluate(model, volume, maps, options, preprocess, output, ground_truth, cancel,
                             on_progress)
    except Cancelled:
        return
    except Exception as exc:  # a bug or a model crash: a message, no traceback in the GUI
        yield EvalError(format_error(exc))


def _evaluate(model: Any, volume: Volume, maps: Sequence[MapInfo], options: EvalOptions,
              preprocess: PreprocessConfig, output: Any, ground_truth: np.ndarray | None,
              cancel: threading.Event, on_progress: Callable[[Progress], None] | None) -> Generator:
    import torch

    from esegeta_engine.evaluation.api import METRIC_KEYS, evaluate_map, evaluation_config
    from esegeta_engine.explain import Explainer, Job, build_target
    from esegeta_engine.methods import MethodContext, get_method
    from esegeta_engine.models import get_layer, is_torchscript
    from esegeta_engine.forward.scoring import EvaluationMonitor

    axis = preprocess.axis_order
    per_map = sum(getattr(options, k) for k in ("axioms", "infidelity", "sensitivity", "faithfulness",
                                                "class_contrast", "localisation"))
    total = len(maps) * (per_map + (1 if options.randomisation else 0))
    done = 0
    state = {"message": ""}

    def report(message: str) -> Progress:
        state["message"] = message
        ev = Progress(done, max(total, 1), message)
        if on_progress is not None:
            on_progress(ev)
        return ev

    def on_evaluation(n: int) -> None:
        if on_progress is not None:
            on_progress(Progress(done, max(total, 1), f"{state['message']}: {n} model evaluations", n))

    cfg = evaluation_config(axioms=options.axioms, infidelity=options.infidelity,
                            sensitivity=options.sensitivity, faithfulness=options.faithfulness,
                            class_contrast=options.class_contrast, **options.settings())
    monitor = EvaluationMonitor(cancel, on_evaluation)
    explainer = Explainer(model, preprocess=preprocess, output=output)
    yield report("preparing the input")
    x = explainer.prepare_input(volume)
    raw = explainer.raw_output(x)
    if ground_truth is not None and options.localisation:
        ground_truth = np.asarray(ground_truth) != 0
    prepared: dict[str, Any] = {}

    def score_model_for(info: MapInfo) -> Any:
        key = info.target.model_dump_json() + f"|roi={info.roi_layer}"
        if key not in prepared:
            target = build_target(info.target, preprocess.spatial_dims, info.roi_mask, axis).to(explainer.device)
            target.prepare(raw)
            prepared[key] = target
        return explainer.make_score_model(prepared[key], x, monitor)

    for i, info in enumerate(maps):
        row: dict[str, Any] = {"layer": info.name, "method": info.label, "target": info.target_label}
        notes: dict[str, str] = {}
        curves = None
        try:
            score_model = score_model_for(info)
            attr_np = _to_model(info.array, axis)
            if attr_np.shape != tuple(x.shape[2:]):
                raise EvaluationSetupError(f"the map has shape {info.array.shape}, not the input's grid "
                                           f"{tuple(volume.data.shape[:preprocess.spatial_dims])}")
            if not np.isfinite(attr_np).all():
                raise EvaluationSetupError("the map has NaN or Inf values")
            attr = torch.from_numpy(attr_np)[None, None].to(x.device, x.dtype)  # (1, 1, *spatial)
            setup_error = None
        except Cancelled:
            raise
        except Exception as exc:
            setup_error = _reason(exc)
        spec = get_method(info.method)
        job = Job(spec, dict(info.params), info.cls, info.target_label, (0,), info.model_layer,
                  info.noise_tunnel)
        names = [k for k in ("axioms", "infidelity", "sensitivity", "faithfulness", "class_contrast")
                 if getattr(options, k)]
        yield report(f"{info.name}: " + ", ".join(names + (["localisation"] if options.localisation else [])))
        try:  # the engine's evaluation of one map, as in `esegeta run`
            if setup_error:
                raise EvaluationSetupError(setup_error)
            ctx = MethodContext(score_model=score_model, inputs=x, target=info.cls, seed=options.seed,
                                layer=get_layer(model, info.model_layer) if info.model_layer else None,
                                layer_name=info.model_layer, torchscript=is_torchscript(model))
            gt = None
            if options.localisation:
                if ground_truth is None:
                    notes["localisation"] = "no ground-truth labels layer chosen"
                    row.update({k: math.nan for k in METRIC_COLUMNS["localisation"]})
                else:
                    gt = ground_truth
            if spec.needs_batch and options.sensitivity:
                notes["sensitivity"] = f"{info.method} needs a batch of volumes"
            sub = cfg if not spec.needs_batch else evaluation_config(  # sensitivity re-runs need one input
                axioms=options.axioms, infidelity=options.infidelity, faithfulness=options.faithfulness,
                class_contrast=options.class_contrast, **options.settings())
            result = evaluate_map(job, ctx, attr, sub, seed=options.seed, nifti_map=info.array,
                                  ground_truth=gt)
            row.update(result.metrics)
            notes.update(result.notes)
            curves = result.curves
        except Cancelled:
            raise
        except Exception as exc:
            for name in names:
                row.update({k: math.nan for k in METRIC_KEYS[name]})
            if options.localisation:
                row.update({k: math.nan for k in METRIC_COLUMNS["localisation"]})
            notes["map"] = _reason(exc)
        done += len(names) + int(options.localisation)
        if setup_error and "map" not in notes:
            notes["map"] = setup_error
        row["notes"] = notes
        yield RowReady(i, row, curves)
        if cancel.is_set():
            return
    if options.randomisation:
        yield from _randomisation(model, explainer, x, maps, options, output, cancel, score_model_for,
                                  lambda: done, report, on_progress)
        done = total
    yield report("finished")


def _randomisation(model: Any, explainer: Any, x: Any, maps: Sequence[MapInfo], options: EvalOptions,
                   output: Any, cancel: threading.Event, score_model_for: Callable, done_now: Callable,
                   report: Callable, on_progress: Callable | None) -> Generator:
    """Randomisation of every map (one run per map: its method, layer and target)."""
    from esegeta_engine.evaluation.randomisation import run_randomisation
    from esegeta_engine.methods import get_method

    axis = explainer.preprocess.axis_order
    done = done_now()
    for i, info in enumerate(maps):
        yield report(f"{info.name}: randomisation ({options.mode})")
        update: dict[str, Any] = {}
        notes: dict[str, str] = {}
        stages: list[tuple[int, str, np.ndarray]] = []
        try:
            spec = get_method(info.method)
            if spec.needs_batch:
                raise EvaluationSetupError(f"{info.method} needs a batch of volumes")
            target = score_model_for(info).target

            def build(model_copy: Any, target: Any = target) -> Any:
                return explainer.make_score_model(target, x, model=model_copy)

            def progress(d: int, t: int, message: str, name: str = info.name) -> None:
                if on_progress is not None:
                    on_progress(Progress(done, max(len(maps), 1), f"{name}: randomisation {d}/{t} ({message})"))

            result = run_randomisation(model, build, x, info.cls, [(spec, info.params, info.model_layer)],
                                       mode=options.mode, seed=options.seed, max_stages=options.max_stages,
                                       threshold=options.threshold, calibrate=options.calibrate,
                                       footprint=options.footprint, cancel=cancel, progress=progress)
            key = next(iter(result.maps), None)
            errors = [e for e in result.errors]
            if key is None or key not in result.original_maps:
                raise EvaluationSetupError("the method failed on the trained model: "
                                           + (errors[0]["message"] if errors else "no map"))
            verdict = result.verdicts.get(key, {})
            passes = verdict.get("passes")
            update["randomisation"] = {True: "pass", False: "fail"}.get(passes, UNDEFINED)
            update["mean_spearman_abs"] = float(verdict.get("mean_spearman_abs", math.nan))
            update["randomisation_rule"] = verdict.get("rule", "")
            update["randomisation_reason"] = verdict.get("reason", "")
            for k in ("mean_similarity", "null", "margin"):
                update[k] = float(verdict.get(k, math.nan))
            notes["randomisation_verdict"] = verdict.get("reason", "")
            update["randomisation_scores"] = result.scores.get(key, {})
            original = _to_nifti(result.original_maps[key][0], axis)
            ref = info.array
            if original.shape == ref.shape:
                scale = float(np.abs(ref).max()) or 1.0
                if float(np.abs(original - ref).max()) > 1e-3 * scale:
                    notes["randomisation"] = ("the re-run of the method on the trained model differs from "
                                              "the layer" + (" (noise tunnel not re-run)" if info.noise_tunnel
                                                              else "") + "; stages are compared with the re-run")
            if errors:
                notes["randomisation_errors"] = "; ".join(f"{e['stage']}: {e['message']}" for e in errors)[:300]
            for k, stage_layer in enumerate(result.stages, start=1):
                arr = result.maps[key].get(stage_layer)
                if arr is not None:
                    stages.append((k, stage_layer, _to_nifti(arr[0], axis)))
        except Cancelled:
            raise
        except Exception as exc:
            update.update(randomisation=UNDEFINED, mean_spearman_abs=math.nan)
            notes["randomisation"] = _reason(exc)
        update["notes"] = notes
        done += 1
        yield StagesReady(i, update, stages)


# -- formatting and export ----------------------------------------------------------------------


def evaluate_groups(
    model: Any,
    groups: Sequence[tuple[Volume, Sequence[MapInfo]]],
    options: EvalOptions,
    *,
    preprocess: PreprocessConfig,
    output: int | str | None,
    ground_truth: np.ndarray | None = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> Generator[Any, None, None]:
    """:func:`evaluate_events` for maps of several inputs; indices count over all groups.

    Every metric of every group runs before any randomisation (so Cancel during
    randomisation keeps all metric rows); never raises.
    """
    cancel = cancel or threading.Event()
    offset = 0
    later = []
    per_map = EvalOptions(**{**options.__dict__, "randomisation": False})
    for volume, maps in groups:
        for ev in evaluate_events(model, volume, maps, per_map, preprocess=preprocess, output=output,
                                  ground_truth=ground_truth, cancel=cancel, on_progress=on_progress):
            if isinstance(ev, (RowReady, StagesReady)):
                ev.index += offset
            if not (isinstance(ev, Progress) and ev.message == "finished"):
                yield ev
        later.append((offset, volume, maps))
        offset += len(maps)
        if cancel.is_set():
            return
    if not options.randomisation:
        return
    only = EvalOptions(**{**options.__dict__, "infidelity": False, "sensitivity": False, "axioms": False,
                          "faithfulness": False, "localisation": False, "class_contrast": False})
    for offset, volume, maps in later:
        for ev in evaluate_events(model, volume, maps, only, preprocess=preprocess, output=output,
                                  cancel=cancel, on_progress=on_progress):
            if isinstance(ev, RowReady):
                continue  # empty rows of the randomisation-only pass
            if isinstance(ev, StagesReady):
                ev.index += offset
            yield ev
        if cancel.is_set():
            return
