"""Randomisation of existing maps for :class:`~esegeta_engine.evaluation.session.EvaluationSession`.

Maps of one class, target and execution share one
:func:`~esegeta_engine.evaluation.randomisation.run_randomisation` (one set of randomised copies for
all their methods, as ``esegeta run`` groups them); each copy runs through the score model of the
map's own execution. The re-run on the trained model is compared with the map (a note says when
they differ, e.g. after a noise tunnel or an edit).
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from esegeta_engine.errors import Cancelled
from esegeta_engine.evaluation.session import EvaluationSession, MapRandomised, MapToScore, _reason
from esegeta_engine.explain import Progress
from esegeta_engine.io import Volume


def randomise(session: EvaluationSession, volume: Volume, maps: Sequence[MapToScore],
              offset: int = 0) -> Generator[Progress | MapRandomised, None, None]:
    """Yield a :class:`MapRandomised` per map (indices from ``offset``) and progress."""
    from esegeta_engine.evaluation.randomisation import run_randomisation
    from esegeta_engine.methods import get_method
    from esegeta_engine.preprocess import AxisOrder

    r = session.config.randomisation
    if r is None:
        return
    axis = AxisOrder(session.preprocess.axis_order)
    groups: dict[tuple[str, str, str, int], list[int]] = {}
    for i, info in enumerate(maps):
        key = (info.target.model_dump_json(), str(info.roi_key), json.dumps(info.execution, sort_keys=True),
               info.cls)
        groups.setdefault(key, []).append(i)
    modes = ["cascading", "independent"] if r.mode == "both" else [r.mode]
    for indices in groups.values():
        first = maps[indices[0]]
        runnable, entries, failed = [], [], {}
        for i in indices:
            spec = get_method(maps[i].method)
            if spec.needs_batch or not spec.evaluable:
                failed[i] = f"{maps[i].method} cannot be re-run on one volume"
            else:
                runnable.append(i)
                entries.append((spec, spec.resolve_params(maps[i].params), maps[i].layer))
        for i, why in failed.items():
            yield MapRandomised(offset + i, {"randomisation": None, "mean_spearman_abs": math.nan},
                                {"randomisation": why})
        if not runnable:
            continue
        try:
            explainer, x, raw = session._prepared(volume, session._execution_of(first))
            target = session._target(volume, first, explainer, x, raw)
        except Cancelled:
            raise
        except Exception as exc:
            for i in runnable:
                yield MapRandomised(offset + i, {"randomisation": None}, {"randomisation": _reason(exc)})
            continue
        for mode in modes:
            yield session._report(f"{first.target_label or first.name}: randomisation ({mode})")
            if session.cancel.is_set():  # before the layer-order pass and the first stage
                raise Cancelled("cancelled by the user")

            def build(model_copy: Any, target: Any = target, explainer: Any = explainer, x: Any = x) -> Any:
                return explainer.make_score_model(target, x, model=model_copy)  # as the map ran

            def progress(d: int, t: int, message: str, mode: str = mode) -> None:
                if session.on_progress is not None:
                    session.on_progress(Progress(session.done, max(session.total, 1),
                                              f"randomisation ({mode}) {d}/{t}: {message}"))

            result = run_randomisation(session.model, build, x, first.cls, entries, mode=mode, seed=session.seed,
                                       max_stages=r.max_stages, threshold=r.threshold, calibrate=r.calibrate,
                                       footprint=r.footprint, cancel=session.cancel, progress=progress,
                                       order_input=order_probe(x, explainer.form_for(x)))
            if session.cancel.is_set():
                raise Cancelled("cancelled by the user")
            for i, key in zip(runnable, _entry_keys(result)):
                yield _verdict(offset + i, maps[i], result, key, axis, mode)
            session.done += len(runnable)



def _verdict(index: int, info: MapToScore, result: Any, key: str | None, axis: Any,
             mode: str) -> MapRandomised:
    update: dict[str, Any] = {"randomisation_mode": mode}
    notes: dict[str, str] = {}
    stages: list[tuple[int, str, np.ndarray]] = []
    if key is None or key not in result.original_maps:
        errors = [e["message"] for e in result.errors]
        update.update(randomisation=None, mean_spearman_abs=math.nan)
        notes["randomisation"] = "the method failed on the trained model: " + (errors[0] if errors else "no map")
        return MapRandomised(index, update, notes)
    verdict = result.verdicts.get(key, {})
    update["randomisation"] = {True: "pass", False: "fail"}.get(verdict.get("passes"))
    update["mean_spearman_abs"] = float(verdict.get("mean_spearman_abs", math.nan))
    update["randomisation_rule"] = verdict.get("rule", "")
    update["randomisation_reason"] = verdict.get("reason", "")
    for k in ("mean_similarity", "null", "margin"):
        update[k] = float(verdict.get(k, math.nan))
    notes["randomisation_verdict"] = verdict.get("reason", "")
    update["randomisation_scores"] = result.scores.get(key, {})
    original = np.ascontiguousarray(axis.to_nifti(result.original_maps[key][0])).astype(np.float32)
    if original.shape == info.array.shape:
        scale = float(np.abs(info.array).max()) or 1.0
        if float(np.abs(original - info.array).max()) > 1e-3 * scale:
            notes["randomisation"] = ("the re-run of the method on the trained model differs from the map"
                                      + (" (noise tunnel not re-run)" if info.noise_tunnel else "")
                                      + "; stages are compared with the re-run")
    errors = [e for e in result.errors if e.get("method") in (None, key)]
    if errors:
        notes["randomisation_errors"] = "; ".join(f"{e['stage']}: {e['message']}" for e in errors)[:300]
    for k, stage_layer in enumerate(result.stages, start=1):
        arr = result.maps[key].get(stage_layer)
        if arr is not None:
            stages.append((k, stage_layer, np.ascontiguousarray(axis.to_nifti(arr[0])).astype(np.float32)))
    return MapRandomised(index, update, notes, stages)



def _entry_keys(result: Any) -> list[str | None]:
    """The result key of each method entry, in the order given (``None``: it failed on the trained model)."""
    return [k if k in result.original_maps else None for k in result.maps]


def order_probe(x: Any, form: Any, edge: int = 32) -> Any:
    """A small input for the randomisation's layer-order pass: one patch of the sliding window, or a
    crop of at most ``edge`` voxels per axis padded to the network's multiple (the whole volume
    would cost a full, uncancellable forward pass that ignores the patch size)."""
    import torch.nn.functional as F

    spatial = tuple(int(s) for s in x.shape[2:])
    size = tuple(int(p) for p in form.sliding.patch_size) if form.sliding is not None else \
        tuple(min(s, edge) for s in spatial)
    crop = x[(slice(0, 1), slice(None), *(slice(0, min(s, p)) for s, p in zip(spatial, size)))]
    div = max(int(form.divisible_by), 1)
    target = [max(p, -(-min(s, p) // div) * div) if form.sliding is None else p for s, p in zip(spatial, size)]
    pad: list[int] = []
    for got, want in zip(reversed(crop.shape[2:]), reversed(target)):
        pad.extend([0, max(want - got, 0)])
    return F.pad(crop, pad) if any(pad) else crop
