"""Predictions on the scan's grid: the label map and the per-class probabilities.

:func:`class_probabilities` turns a model's output on one volume into probabilities
``(x, y, z, K)`` on the volume's own grid (a deployed pipeline's probabilities as they
are; a model's logits through softmax, or sigmoid for one channel), so a user can check
that what the engine explains is what their pipeline predicts. ``esegeta predict`` writes
``<volume>__prediction.nii.gz`` and ``<volume>__probabilities.nii.gz`` (4D float32,
classes on the 4th axis) with the scan's affine, after every input has been read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esegeta_engine.io import Volume, save_map

PROBABILITIES = "probabilities.nii.gz"


def class_probabilities(explainer: Any, volume: Volume, outputs: str = "logits") -> tuple[np.ndarray, str]:
    """Probabilities ``(*spatial, K)`` of ``volume`` on its own grid, and how they were made.

    Parameters
    ----------
    explainer : Explainer
        The model, its preprocessing and execution.
    volume : Volume
        The scan.
    outputs : {"logits", "probabilities"}
        What the model returns (a loaded source says; see :class:`~esegeta_engine.models.LoadedModel`).
    """
    out = explainer.raw_output(explainer.prepare_input(volume)).float()
    if outputs == "probabilities":
        how = "the pipeline's own probabilities"
    elif out.shape[1] > 1:
        out, how = torch.softmax(out, dim=1), "softmax of the model output over its channels"
    else:
        out, how = torch.sigmoid(out), "sigmoid of the model's single output channel"
    geometry = explainer.geometry(volume)
    arr = out[0].detach().cpu().numpy()
    return np.stack([geometry.to_nifti(a) for a in arr], axis=-1).astype(np.float32), how


def write_prediction(explainer: Any, volume: Volume, out: Path, stem: str, outputs: str = "logits",
                     probabilities: bool = True) -> dict[str, Any]:
    """Write the label map (and the probabilities) of ``volume`` into ``out``; returns their names."""
    entry: dict[str, Any] = {}
    if probabilities:
        probs, how = class_probabilities(explainer, volume, outputs)
        labels = probs.argmax(-1) if probs.shape[-1] > 1 else (probs[..., 0] > 0.5)
        entry["probabilities"] = save_map(probs, volume, out / f"{stem}__{PROBABILITIES}").name
        entry["probabilities_from"] = how
    else:
        labels = explainer.predict(volume)
    entry["prediction"] = save_map(labels.astype(np.uint8), volume, out / f"{stem}__prediction.nii.gz",
                                   dtype=np.uint8).name
    return entry


def _settings(args: argparse.Namespace) -> Any:
    """The ``preprocess`` and ``execution`` sections the flags give, validated as a config's (errors name the
    keys, which the command line says as its flags)."""
    from pydantic import ValidationError, create_model

    from esegeta_engine.config import ExecutionConfig, PreprocessConfig
    from esegeta_engine.config_errors import format_validation_error

    pre = {"spatial_dims": args.spatial_dims, "in_channels": args.in_channels, "normalisation": args.normalisation,
           "orientation": getattr(args, "orientation", None),
           **({"axis_order": args.axis_order} if args.axis_order else {})}
    execution = {"overlap": getattr(args, "overlap", 0.25), "precision": getattr(args, "precision", "fp32"),
                 **({"patch_size": args.patch_size[0] if len(args.patch_size) == 1 else args.patch_size}
                    if args.patch_size else {})}  # one size for every axis, as explain reads it
    sections = create_model("PredictSettings", preprocess=(PreprocessConfig, ...), execution=(ExecutionConfig, ...))
    try:
        valid = sections.model_validate({"preprocess": pre, "execution": execution})
    except ValidationError as exc:
        raise format_validation_error(exc, "command line", sections,
                                      "fix the keys above; `esegeta predict --help` lists its flags") from None
    return valid


def cmd_predict(args: argparse.Namespace) -> int:
    """``esegeta predict``: label maps and probabilities of every volume, written after all are read."""
    from esegeta_engine.explain import Explainer
    from esegeta_engine.io import load_volume, write_json
    from esegeta_engine.models import Trust, load_source
    from esegeta_engine.cli_sources import model_config_from_args
    from esegeta_engine.pipeline import volume_stem

    mcfg = model_config_from_args(args)
    settings = _settings(args)  # before the model loads: a bad flag is said at once
    loaded = load_source(mcfg, Trust(pickled=args.trust_pickled, bundle=args.trust_bundle))
    settings = loaded.configure(settings)  # a deployed pipeline's own preprocessing, as explain's run does
    pre, execution = settings.preprocess, settings.execution
    try:
        volumes = [load_volume(v, spatial_dims=pre.spatial_dims, channels=pre.in_channels) for v in args.volume]
    except Exception as exc:
        raise loaded.volume_error(exc) from None
    explainer = Explainer(loaded.module, pre, execution=execution, output=mcfg.output)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems = [volume_stem(v.path, i) for i, v in enumerate(volumes)]
    results = []
    for i, (v, stem) in enumerate(zip(volumes, stems)):
        if not getattr(args, "quiet", False):
            print(f"predicting {v.path.name if v.path else stem} ({i + 1}/{len(volumes)}) ...", file=sys.stderr,
                  flush=True)
        entry = write_prediction(explainer, v, out, stem, loaded.outputs)
        results.append({"volume": str(v.path), **entry})
        print(f"{v.path.name if v.path else stem}: {entry['prediction']}, {entry['probabilities']}")
    write_json({"model": {**loaded.description, "class_names": loaded.class_names}, "volumes": results},
               out / "prediction.json")
    return 0


__all__ = ["class_probabilities", "cmd_predict", "write_prediction"]
