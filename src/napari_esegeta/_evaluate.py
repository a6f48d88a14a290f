"""The Evaluate tab's two mappings, as plain functions (no Qt): layers -> map records, session events -> rows.

The evaluation itself is the engine's one
:class:`~esegeta_engine.evaluation.session.EvaluationSession`, the same that ``esegeta run``
and ``esegeta evaluate`` use: a map is scored on the execution recorded in its layer's
metadata (whole volume or the sliding window, precision), so the numbers describe the
function the map explains and cost the memory that explaining it did.

* :func:`map_info` reads a result layer's provenance (``metadata["esegeta"]``) into a
  :class:`~esegeta_engine.evaluation.session.MapToScore`;
* :func:`evaluate_groups` drains the session for maps of one or more input layers and
  yields :class:`Progress`, :class:`RowReady` (one per map, as soon as it is scored),
  :class:`StagesReady` (randomisation) and :class:`EvalError`; it never raises. Every map
  is scored before any randomisation, so Cancel during randomisation keeps every row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from esegeta_engine.config import EvaluationConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import Cancelled
from esegeta_engine.evaluation.session import MapToScore, metric_columns
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
from napari_esegeta._records import layer_record, provenance, record_label

MapInfo = MapToScore  # the record of one result layer
STAGE_KEY = "randomisation_stage"


@dataclass
class EvalOptions:
    """What the Evaluate form asks for: the engine's evaluation config, localisation, the seed."""

    config: EvaluationConfig = field(default_factory=EvaluationConfig)
    localisation: bool = False
    seed: int = 0

    def columns(self) -> list[str]:
        """Metric columns for the chosen metrics (the engine's metric keys)."""
        return metric_columns(self.config, self.localisation)


@dataclass
class RowReady:
    """The metrics of one map (NaN where undefined; ``row["notes"][metric]`` says why)."""

    index: int
    row: dict[str, Any]
    curves: dict[str, Any] | None = None


@dataclass
class StagesReady:
    """Randomisation of one map: verdict, scores, stage maps in NIfTI order."""

    index: int
    update: dict[str, Any]
    stages: list[tuple[int, str, np.ndarray]] = field(default_factory=list)
    #: the stages' layer data ``(data, kwargs)``, built in the worker by :func:`evaluate_layers`
    layers: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)


@dataclass
class EvalError:
    """A problem that stopped the evaluation (text has problem and fix)."""

    text: str


class EvaluationSetupError(ValueError):
    """A result layer that cannot be evaluated (message says why)."""


def map_info(layer: Any, label_layers: Mapping[str, Any] | None = None) -> MapToScore:
    """The map record of a result layer, from its metadata.

    ``label_layers`` (name -> Labels layer) supplies the ROI of ROI-target maps.

    Raises
    ------
    EvaluationSetupError
        If the provenance lacks what is needed to rebuild the target.
    """
    meta, record = provenance(layer), layer_record(layer)
    if record is None:
        raise EvaluationSetupError(f"'{layer.name}' is not an attribution layer (no method in its metadata)")
    if meta.get("evaluable", True) is False:
        raise EvaluationSetupError(f"'{layer.name}' is a feature-visualisation volume, not an "
                                   "attribution map: trust metrics do not apply")
    kind, cls = meta.get("target"), meta.get("class")  # the target's kind is provenance, not the record's
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
        target = TargetConfig(kind=kind, classes=[record.cls], activation=meta.get("activation"),
                              voxel=[int(v) for v in voxel] if voxel else None,
                              frozen=bool(meta.get("frozen", True)), **channel)
    except Exception as exc:
        raise EvaluationSetupError(f"'{layer.name}': target cannot be rebuilt ({exc})") from None
    return MapToScore(name=layer.name, method=record.method, params=dict(record.params),
                      cls=record.cls, target=target, array=np.asarray(layer.data, dtype=np.float32),
                      layer=record.layer, noise_tunnel=record.noise_tunnel,
                      target_label=meta.get("target_label", f"{kind}-{cls}"), label=record_label(record),
                      execution=record.execution or None, roi_mask=roi_mask, roi_key=roi_layer)


def input_layer_of(layer: Any) -> str | None:
    """The name of the image layer a result layer explains."""
    return provenance(layer).get("input_layer")


def _row(info: MapToScore, metrics: dict[str, Any], notes: dict[str, str]) -> dict[str, Any]:
    return {"layer": info.name, "method": info.label or info.method, "target": info.target_label,
            **metrics, "notes": dict(notes)}


def evaluate_groups(
    model: Any,
    groups: Sequence[tuple[Volume, Sequence[MapToScore]]],
    options: EvalOptions,
    *,
    preprocess: PreprocessConfig,
    output: int | str | None,
    execution: Any = None,
    ground_truth: np.ndarray | None = None,
    cancel: threading.Event | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> Generator[Any, None, None]:
    """Evaluate maps of several inputs with one engine session; yields events, never raises.

    Parameters
    ----------
    model, preprocess, output
        The session's model and settings (as the maps were made with).
    groups : sequence of (Volume, maps)
        Each input (NIfTI order) with the maps that explain it.
    options : EvalOptions
        The evaluation config, localisation, seed.
    execution : ExecutionConfig, optional
        For maps whose layer does not record its execution (the Model tab's).
    ground_truth : np.ndarray, optional
        Mask on the inputs' grid (NIfTI order) for localisation.
    cancel : threading.Event, optional
        Set from any thread to stop at the next model evaluation.
    on_progress : callable, optional
        Called from this (worker) thread with the latest :class:`Progress`.
    """
    from esegeta_engine.evaluation.session import EvaluationSession, MapRandomised, MapScored

    session = EvaluationSession(model, options.config, preprocess=preprocess, output=output, seed=options.seed,
                                execution=execution, cancel=cancel, on_progress=on_progress)
    every = [m for _, maps in groups for m in maps]
    session.total = len(every) * session.per_map_steps(options.localisation) + \
        (len(every) if options.config.randomisation is not None else 0)
    try:
        offset = 0
        for volume, maps in groups:
            for ev in session.score(volume, maps, ground_truth, localisation=options.localisation, offset=offset):
                if isinstance(ev, MapScored):
                    yield RowReady(ev.index, _row(every[ev.index], ev.metrics, ev.notes), ev.curves)
                else:
                    yield ev
            offset += len(maps)
        offset = 0
        for volume, maps in groups:
            for ev in session.randomise(volume, maps, offset=offset):
                if isinstance(ev, MapRandomised):
                    yield StagesReady(ev.index, {**ev.update, "notes": ev.notes}, ev.stages)
                else:
                    yield ev
            offset += len(maps)
        yield Progress(session.total, max(session.total, 1), "finished")
    except Cancelled:
        return
    except Exception as exc:  # a bug or a model crash: a message, no traceback in the GUI
        yield EvalError(format_error(exc))


def evaluate_events(model: Any, volume: Volume, maps: Sequence[MapToScore], options: EvalOptions,
                    **kwargs: Any) -> Generator[Any, None, None]:
    """:func:`evaluate_groups` for the maps of one input."""
    return evaluate_groups(model, [(volume, maps)], options, **kwargs)


def stage_layers(ev: StagesReady, info: MapToScore, source: Any) -> list[tuple[Any, dict[str, Any]]]:
    """Hidden layer data of each randomisation stage map, with the input layer's geometry."""
    from napari_esegeta._layers import result_layer_data
    from napari_esegeta._run import InputLayer

    source = InputLayer.of(source)
    out = []
    for k, stage_layer, arr in ev.stages:
        prov = {"params": info.params, "layer": info.layer, "noise_tunnel": info.noise_tunnel,
                "target": info.target.kind, "class": info.cls, "input_layer": source.name,
                STAGE_KEY: k, "randomised_layer": stage_layer, "source_layer": info.name,
                "mode": ev.update.get("randomisation_mode"), "execution": info.execution}
        data, kwargs, _ = result_layer_data(arr, method=info.method, method_label=info.label,
                                            target_label=info.target_label, provenance=prov,
                                            geometry=source.geometry, nifti=source.nifti)
        kwargs["name"] = stage_layer_name(info, k, stage_layer)
        kwargs["visible"] = False  # many volumes in additive blending would hide each other
        out.append((data, kwargs))
    return out


def evaluate_layers(model: Any, groups: Sequence[tuple[Volume, Sequence[MapToScore]]], options: EvalOptions, *,
                    sources: Sequence[Any], **kwargs: Any) -> Generator[Any, None, None]:
    """:func:`evaluate_groups` with each randomisation stage's layer data built here, in the worker.

    ``sources[i]`` is the :class:`~napari_esegeta._run.InputLayer` of the i-th map (over all groups).
    """
    every = [m for _, maps in groups for m in maps]
    for ev in evaluate_groups(model, groups, options, **kwargs):
        if isinstance(ev, StagesReady) and ev.stages:
            try:
                ev.layers = stage_layers(ev, every[ev.index], sources[ev.index])
            except Exception as exc:  # display preparation failed: the scores still stand
                yield EvalError(f"{every[ev.index].name}: stage maps could not be shown — {format_error(exc)}")
        yield ev
