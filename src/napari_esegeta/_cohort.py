"""Browse a cohort run folder (no Qt): subjects, models, methods, and the layers to show.

A cohort folder is what ``esegeta run`` writes for a config with ``models:``
and ``cohort:`` sections (its ``manifest.json`` has ``"kind": "cohort"``).
:func:`cohort_layers` gives, for one subject / model / method, the subject's
image, its map and the cohort's aggregate (mean of normalised maps) as napari
layer data with the NIfTI geometry, ready to put side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esegeta_engine.errors import EsegetaError
from esegeta_engine.io import load_volume
from napari_esegeta._geometry import nifti_to_layer_kwargs
from napari_esegeta._layers import result_layer_data
from napari_esegeta._reader import LayerData, nifti_metadata, volume_layer_data


@dataclass
class CohortRun:
    """A cohort run folder, read from its manifest."""

    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> CohortRun:
        """Read ``folder/manifest.json``.

        Raises
        ------
        EsegetaError
            No manifest, or the manifest of an ordinary (non-cohort) run.
        """
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.is_file():
            raise EsegetaError(f"{folder} holds no manifest.json", "choose the output folder of a cohort run")
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("kind") != "cohort":
            raise EsegetaError(f"{folder.name} is a single run, not a cohort run",
                               "open single-run maps with File > Open; this panel reads cohort folders")
        return cls(folder, manifest)

    @property
    def subjects(self) -> list[str]:
        """Subjects in cohort order."""
        return [v["subject"] for v in self.manifest["volumes"]]

    @property
    def models(self) -> list[str]:
        """Model names."""
        return [m["name"] for m in self.manifest["models"]]

    @property
    def methods(self) -> list[str]:
        """``method · class N`` choices present among the finished maps."""
        seen = dict.fromkeys(f"{r['method']} · class {r['class']}" for r in self.manifest["results"]
                             if r["status"] == "ok")
        return list(seen)

    def _split(self, choice: str) -> tuple[str, int]:
        method, _, cls = choice.rpartition(" · class ")
        return method, int(cls)

    def map_file(self, subject: str, model: str, choice: str) -> Path | None:
        """The subject's map for a model and method choice (None if it failed or is missing)."""
        method, cls = self._split(choice)
        for r in self.manifest["results"]:
            if (r["subject"], r["model"], r["method"], r["class"], r["status"]) == (subject, model, method, cls, "ok"):
                return self.folder / r["file"]
        return None

    def aggregate(self, model: str, choice: str) -> dict[str, Any] | None:
        """The aggregate entry (``mean``/``std`` files, ``n``) or None when the cohort has none."""
        method, cls = self._split(choice)
        for a in (self.manifest.get("cohort") or {}).get("aggregates", []):
            if (a["model"], a["method"], a["class"]) == (model, method, cls):
                return a
        return None

    @property
    def grid_note(self) -> str:
        """Why there are (or are not) aggregate maps."""
        return (self.manifest.get("cohort") or {}).get("grid_note") or self.manifest["plan"]["grid_note"]


def cohort_layers(run: CohortRun, subject: str, model: str, choice: str) -> list[LayerData]:
    """Layer data: the subject's image, its map and, when the cohort has one, the aggregate mean.

    Raises
    ------
    EsegetaError
        When the subject's map for that choice is missing (failed job).
    """
    entry = next(v for v in run.manifest["volumes"] if v["subject"] == subject)
    vol = load_volume(entry["path"], spatial_dims=2 if len(entry["shape"]) == 2 else 3)
    nifti = nifti_metadata(vol.affine, vol.header, vol.path)
    geometry = nifti_to_layer_kwargs(vol.affine, vol.data.ndim)
    layers = [volume_layer_data(vol, name=subject)]
    path = run.map_file(subject, model, choice)
    if path is None:
        raise EsegetaError(f"no map of {choice} for {subject} under {model} (the job failed or is missing)",
                           "see the manifest's error for that job, or pick another subject")
    method, _ = run._split(choice)
    arr = np.asarray(load_volume(path).data)
    layers.append(result_layer_data(arr, method=method, method_label=f"{model} · {method}",
                                    target_label=subject, provenance={"cohort": str(run.folder)},
                                    geometry=geometry, nifti=nifti))
    agg = run.aggregate(model, choice)
    if agg is not None:
        mean = np.asarray(load_volume(run.folder / agg["mean"]).data)
        layers.append(result_layer_data(mean, method=method, method_label=f"{model} · {method}",
                                        target_label=f"cohort mean (n={agg['n']})",
                                        provenance={"cohort": str(run.folder), "aggregate": agg["mean"]},
                                        geometry=geometry, nifti=nifti))
    return layers
