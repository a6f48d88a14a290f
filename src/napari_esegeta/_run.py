"""Running the engine for the Explain widget, as plain functions (no Qt).

The worker thread iterates :func:`explain_events`; it never raises: planning
errors arrive as a :class:`RunError` event, so napari shows no traceback
notification and the widget shows the problem and its fix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from esegeta_engine.config import MethodConfig, NoiseTunnelConfig, PreprocessConfig, TargetConfig, \
    format_validation_error
from esegeta_engine.errors import EsegetaError, TargetError
from esegeta_engine.explain import Explainer, JobFailed, MapReady
from esegeta_engine.io import Volume
from esegeta_engine.jobs.record import MapRecord
from napari_esegeta._geometry import copy_geometry, layer_to_nifti_affine
from napari_esegeta._layers import image_layers, result_layer_data
from napari_esegeta._model import format_error
from napari_esegeta._reader import header_from_metadata


@dataclass
class RunError:
    """A run that could not start or stopped with an error (text has problem and fix)."""

    text: str


@dataclass(frozen=True)
class InputLayer:
    """What a map layer copies from its input layer, read on the GUI thread (workers never touch layers)."""

    name: str
    geometry: dict[str, Any]
    nifti: dict[str, Any] | None

    @classmethod
    def of(cls, layer: Any) -> InputLayer:
        """Snapshot of a napari layer (or pass an :class:`InputLayer` through)."""
        if isinstance(layer, InputLayer):
            return layer
        return cls(layer.name, copy_geometry(layer), (layer.metadata or {}).get("nifti"))


@dataclass
class Estimated:
    """The run's cost from a one-patch probe; ``stopped``: over the limit, nothing else ran."""

    estimate: Any  # esegeta_engine.jobs.probe.ProbeEstimate
    stopped: bool = False


def _probe(explainer: Explainer, volume: Volume, methods: Sequence[MethodConfig],
           cancel: threading.Event | None = None) -> Any:
    """The one-patch estimate, or None when the probe cannot run or was cancelled (the run then
    reports why, or ends at its first cancel check)."""
    from esegeta_engine.jobs.probe import probe_run

    try:
        return probe_run(explainer, volume, methods, cancel=cancel)
    except Exception:
        return None


@dataclass
class PreparedMap:
    """A :class:`MapReady` with its layer data built in the worker: the GUI thread only adds the layer."""

    event: MapReady
    data: Any
    kwargs: dict[str, Any]
    layers: list[Any] | None = None  # napari's layer model, built in the worker (_layers.image_layers)


COMPONENT_KINDS = ("argmax", "otsu")  # region targets the Explain tab can split into structures


def target_kinds() -> list[str]:
    """Target kinds, from the engine's config schema."""
    return list(TargetConfig.model_fields["kind"].annotation.__args__)


def activation_choices() -> list[str]:
    """Activations (``default`` = the engine's default for the kind)."""
    ann = TargetConfig.model_fields["activation"].annotation
    lit = [a for a in ann.__args__ if a is not type(None)][0]
    return ["default", *lit.__args__]


def parse_classes(text: str, names: Sequence[str] = ()) -> list[int] | None:
    """``"1, 2"`` or ``"vessel"`` -> class indices; ``""`` -> None (the target's default classes).

    Parameters
    ----------
    text : str
        Class indices and/or names, separated by commas.
    names : sequence of str
        The model's class names by index (empty when unknown: indices only,
        checked later by the engine).

    Raises
    ------
    TargetError
        If an entry is neither a known name nor a valid index.
    """
    items = [t.strip() for t in text.replace(";", ",").split(",") if t.strip()]
    if not items:
        return None
    lookup = {n.lower(): i for i, n in enumerate(names)}
    known = ", ".join(f"{n} ({i})" for i, n in enumerate(names))
    classes = []
    for item in items:
        if item.lower() in lookup:
            classes.append(lookup[item.lower()])
            continue
        try:
            index = int(item)
        except ValueError:
            fix = (f"use one of the model's classes: {known}" if names else
                   "write class indices (e.g. 1 or 0, 1), or type the class names in the Model tab")
            raise TargetError(f"class {item!r} is not a class of the model", fix) from None
        if index < 0 or (names and index >= len(names)):
            raise TargetError(f"class index {index} does not exist",
                              f"use one of the model's classes: {known}" if names else "use 0, 1, ...")
        classes.append(index)
    return classes


def class_label(cls: int, cls_label: str, names: Sequence[str] = ()) -> str:
    """A job's target label with the class name.

    ``argmax-class1`` -> ``vessel``, ``voxel-class1`` -> ``voxel-vessel``.

    The argmax target (the default) is named by its class alone, to keep
    layer names short; the target kind stays in the layer's metadata.
    """
    kind, part = cls_label.split("-", 1)[0], cls_label.partition("__component-")[2]
    if not (0 <= cls < len(names)) or kind == "volume":  # visualisations are named by what they show
        return cls_label
    suffix = f" #{int(part)}" if part.isdigit() else ""  # one structure: ``vessel #3``
    return (names[cls] if kind == "argmax" else f"{kind}-{names[cls]}") + suffix


def named_message(message: str, names: Sequence[str] = ()) -> str:
    """An engine progress message with class names (``argmax-class1`` -> ``vessel``)."""
    if not names:
        return message
    import re

    def repl(match: re.Match) -> str:
        return class_label(int(match.group(2)), match.group(0), names)

    return re.sub(r"\b([a-z_]+)-class(\d+)\b", repl, message)


def make_target(kind: str, classes: list[int] | None = None, activation: str = "default",
                voxel: Sequence[int] | None = None, roi_name: str | None = None,
                frozen: bool = True, layer: str | None = None, channel: int = 0,
                components: bool = False) -> TargetConfig:
    """Validated :class:`TargetConfig` from the widget's values.

    The ROI mask itself is passed to the engine as an array (``roi_name`` is
    only checked here), so the target has no ``roi_mask`` file.

    Raises
    ------
    EsegetaError
        With the engine's message for invalid combinations.
    """
    if kind == "voxel" and not voxel:
        raise TargetError("no voxel picked", "click 'Pick voxel', then click on the image")
    if kind == "roi" and not roi_name:
        raise TargetError("no ROI labels layer chosen", "add a Labels layer with the region to explain")
    if kind == "channel" and not layer:
        raise TargetError("no model layer chosen for the channel target", "load a model, then pick a layer")
    extra: dict[str, Any] = {"layer": layer, "channel": channel} if kind == "channel" else {}
    if components:  # one target per connected structure of the region
        extra["components"] = True
    try:
        return TargetConfig(kind=kind, classes=classes, frozen=frozen,
                            activation=None if activation == "default" else activation,
                            voxel=[int(v) for v in voxel] if voxel else None, **extra)
    except ValidationError as exc:
        raise format_validation_error(exc, "target") from None


def make_method(name: str, params: dict[str, Any], layer: str | None = None,
                noise_tunnel: dict[str, Any] | None = None) -> MethodConfig:
    """Validated :class:`MethodConfig` (checked against the registry)."""
    try:
        return MethodConfig(name=name, params=params, layers=[layer] if layer else [],
                            noise_tunnel=NoiseTunnelConfig(**noise_tunnel) if noise_tunnel else None)
    except ValidationError as exc:
        raise format_validation_error(exc, f"method {name}") from None


def volume_from_layer(layer: Any) -> Volume:
    """The engine :class:`Volume` of an image layer (array order and geometry kept)."""
    data = np.asarray(layer.data, dtype=np.float32)
    meta = layer.metadata or {}
    return Volume(data=data, affine=layer_to_nifti_affine(layer), header=header_from_metadata(meta),
                  path=None)


def roi_from_layer(labels_layer: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean ROI mask (labels > 0) on the input grid.

    Raises
    ------
    TargetError
        If the labels layer has another shape or is empty.
    """
    mask = np.asarray(labels_layer.data) > 0
    if mask.shape != tuple(shape):
        raise TargetError(f"the ROI layer '{labels_layer.name}' has shape {mask.shape}, the image "
                          f"{tuple(shape)}", "draw the ROI in a Labels layer on the image's grid")
    if not mask.any():
        raise TargetError(f"the ROI layer '{labels_layer.name}' is empty", "paint the region first")
    return mask


def refused_text(methods: Sequence[MethodConfig], target: TargetConfig, execution: Any,
                 preprocess: PreprocessConfig, volume_shape: Sequence[int], model: Any = None) -> str | None:
    """Why some of ``methods`` cannot run under this execution (sliding window) or through ``model``
    (a deployed pipeline's own refusals), or ``None``: before any model evaluation, by the engine's rules.
    """
    from esegeta_engine.jobs.refusal import refusals
    from esegeta_engine.preprocess import AxisOrder

    spatial = tuple(volume_shape)[:preprocess.spatial_dims]
    shape = AxisOrder(preprocess.axis_order).to_model(np.broadcast_to(np.float32(0), spatial)).shape
    found = refusals(methods, target.kind, execution, shape, getattr(model, "module", model))
    if not found:
        return None
    names = ", ".join(name for name, _ in found)
    return f"not started: {names} cannot run here. " + format_error(found[0][1])


def explain_events(model: Any, volume: Volume, methods: Sequence[MethodConfig], *,
                   preprocess: PreprocessConfig, target: TargetConfig, output: int | str | None,
                   roi_mask: np.ndarray | None, cancel: threading.Event,
                   timeout_s: float | None = None,
                   on_progress: Callable[[Any], None] | None = None,
                   execution: Any = None, probe: bool = False,
                   probe_limit_s: float | None = None) -> Generator[Any, None, None]:
    """Engine events for one volume; errors become a final :class:`RunError`.

    With ``probe``, one patch is timed first (:func:`esegeta_engine.jobs.probe.probe_run`) and an
    :class:`Estimated` comes before any method runs; above ``probe_limit_s`` seconds the run stops
    there (``stopped``), for the user to confirm.

    Methods run in the calling (worker) thread — a second torch thread would
    compete with it for cores — so progress within a method goes to
    ``on_progress``, called from that thread.
    """
    try:
        refused = refused_text(methods, target, execution, preprocess, volume.data.shape, model)
        if refused:  # before any preparation or model evaluation
            yield RunError(refused)
            return
        explainer = Explainer(model, preprocess=preprocess, target=target, output=output,
                              timeout_s=timeout_s, execution=execution)
        if probe:  # one patch, timed, before any method: the estimate shows before the run's work
            estimate = _probe(explainer, volume, methods, cancel)
            if estimate is not None:
                stop = probe_limit_s is not None and estimate.seconds is not None and estimate.seconds > probe_limit_s
                yield Estimated(estimate, stopped=stop)
                if stop:
                    return
        from esegeta_engine.evaluation.evaluators import axiom_evaluator

        yield from explainer.iter_explain([volume], methods, roi_mask=roi_mask, cancel=cancel,
                                          evaluators=[axiom_evaluator()], threaded=False,
                                          on_progress=on_progress)
    except EsegetaError as exc:
        yield RunError(format_error(exc))
    except Exception as exc:  # a bug or a model crash: still no traceback in the GUI
        yield RunError(format_error(exc))


def explain_layers(model: Any, volume: Volume, methods: Sequence[MethodConfig], *, input_layer: InputLayer,
                   target: TargetConfig, roi_layer: str | None = None, class_names: Sequence[str] = (),
                   axis_order: str = "xyz", **kwargs: Any) -> Generator[Any, None, None]:
    """:func:`explain_events` with each map's layer data (contrast limits, seams, trust) built here.

    Runs in the worker thread, so a new map's numpy never stalls napari; maps arrive as :class:`PreparedMap`.
    """
    for ev in explain_events(model, volume, methods, target=target, **kwargs):
        if isinstance(ev, MapReady):
            try:
                data, layer_kwargs, _ = map_layer_data(ev, input_layer, target, roi_layer, class_names, axis_order)
                layers = image_layers(data, layer_kwargs)  # napari's Image, built here off the GUI thread
            except Exception as exc:  # a bug in display preparation: the run's other maps still come
                yield RunError(f"{ev.job.label}: the map could not be shown — {format_error(exc)}")
                continue
            yield PreparedMap(ev, data, layer_kwargs, layers)
        else:
            yield ev


def predict_labels(model: Any, volume: Volume, preprocess: PreprocessConfig,
                   output: int | str | None, execution: Any = None) -> Any:
    """The model's label map in NIfTI order, or a :class:`RunError` (never raises)."""
    try:
        return Explainer(model, preprocess=preprocess, output=output, execution=execution).predict(volume)
    except Exception as exc:
        return RunError(format_error(exc))


def seam_note(array: np.ndarray, execution: dict[str, Any], axis_order: str = "xyz") -> tuple[dict, str] | None:
    """Seam strength of a sliding-window map (per NIfTI axis) and the note that explains it, or ``None``."""
    if (execution or {}).get("mode") != "sliding_window" or array.ndim != len(execution["patch_size"]):
        return None
    from esegeta_engine.evaluation.seams import seam_strength
    from esegeta_engine.preprocess import AxisOrder

    model = AxisOrder(axis_order).to_model(array)
    strength = {axis_order[k]: round(v, 2) for k, v in
                enumerate(seam_strength(model, execution["patch_size"], execution["overlap"]).values())}
    shown = ", ".join(f"{k} {v:g}" for k, v in strength.items() if v == v)
    return strength, (f"sliding window (patch {execution['patch_size']}, overlap {execution['overlap']}, "
                      f"{execution.get('blend', 'gaussian')} blending): the map can show the patch grid — seam "
                      f"strength {shown or 'n/a'} (|map| on patch-border planes / median plane; 1 = none). "
                      "The seams belong to the deployed function (zero padding at each patch border, blending "
                      "weights), not to the method; docs/execution.md gives measured strengths for other "
                      "overlaps and blendings. Compare tab ▸ Patch grid shows the borders.")


def map_layer_data(event: MapReady, input_layer: Any, target: TargetConfig,
                   roi_layer: str | None = None, class_names: Sequence[str] = (),
                   axis_order: str = "xyz") -> tuple[Any, dict, str]:
    """Layer data for a :class:`MapReady`, with the input layer's geometry and provenance.

    A map with one more axis than the input (per-channel layer maps, layer visualisation)
    comes with ``channel_axis=0``, so ``viewer.add_image`` adds one layer per channel.
    """
    job = event.job
    source = InputLayer.of(input_layer)
    cls_name = class_names[job.cls] if 0 <= job.cls < len(class_names) else None
    prov = {"params": _jsonable(job.params), "layer": job.layer, "noise_tunnel": job.noise_tunnel,
            "target": target.kind, "class": job.cls, "class_name": cls_name, "voxel": target.voxel,
            "roi_layer": roi_layer if target.kind == "roi" else None, "frozen": target.frozen,
            "activation": target.resolved_activation, "seconds": round(event.seconds, 3),
            "evaluations": event.evaluations, "input_layer": source.name,
            "family": job.spec.family, "evaluable": job.spec.evaluable, "axiom": _axiom(event.metrics),
            "execution": dict(event.execution or {})}  # the Evaluate tab scores the map on the same execution
    if target.kind == "channel":
        prov.update(target_layer=target.layer, channel=target.channel)
    seams = seam_note(event.array, event.execution, axis_order)
    if seams is not None:  # in the map's record and in the note napari shows with the layer
        prov.update(seam_strength=seams[0], notes=[*event.notes, seams[1]])
    from esegeta_engine.evaluation.evaluators import scalar_metrics
    from esegeta_engine.evaluation.trust import scorecard

    prov["trust"] = scorecard(scalar_metrics(event.metrics))  # what was verified about this map
    if getattr(job, "details", None):  # one structure (component): class, size, centroid to jump to
        prov["target_details"] = job.details
    # the engine's record of this map (the manifest's shape): what the Evaluate tab and saving read back
    prov["record"] = MapRecord(key=job.key, method=job.spec.name, label=job.label, target=job.cls_label,
                               cls=job.cls, status="ok", layer=job.layer, noise_tunnel=job.noise_tunnel,
                               params=_jsonable(job.params), seconds=round(event.seconds, 3),
                               model_evaluations=event.evaluations, expected_evaluations=job.expected_evaluations,
                               model_inputs=event.inputs_evaluated, execution=event.execution,
                               notes=prov.get("notes") or event.notes or None).to_json()
    array = event.array
    per_channel = array.ndim == len(source.geometry["scale"]) + 1  # (*grid, k): one volume per layer channel
    if per_channel:
        array = np.moveaxis(array, -1, 0)
    data, kwargs, kind = result_layer_data(array, method=job.spec.name, method_label=job.label,
                                           target_label=class_label(job.cls, job.cls_label, class_names),
                                           provenance=prov,
                                           geometry=source.geometry, nifti=source.nifti)
    if per_channel:  # napari adds one layer per channel, each with the input's geometry
        kwargs["channel_axis"] = 0
    return data, kwargs, kind


def failure_text(event: JobFailed) -> str:
    """One line for a failed / cancelled job."""
    return f"{event.job.label} · {event.job.cls_label}: {event.status} — {event.error}"


def _axiom(metrics: dict[str, Any]) -> dict[str, Any]:
    """The map's completeness check (``axiom_status``: ok, warning, undefined or none)."""
    keys = ("completeness_error", "axiom_status", "axiom_note", "F_input", "F_baseline", "attribution_sum")
    return {k: metrics[k] for k in keys if k in metrics}


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
