"""Evaluation table helpers: value formatting, notes, CSV export, stage layer names."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esegeta_engine.io import atomic_write
from esegeta_engine.tables import safe_cell

if TYPE_CHECKING:
    from napari_esegeta._evaluate import MapInfo

UNDEFINED = "undefined"


def format_value(value: Any) -> str:
    """Table text: 4 significant digits, ``undefined`` for NaN / None."""
    if value is None:
        return UNDEFINED
    if isinstance(value, (float, np.floating)):
        return UNDEFINED if not math.isfinite(float(value)) else f"{float(value):.4g}"
    return str(value)


def notes_text(notes: dict[str, str]) -> str:
    """One line of the notes of a row."""
    return "; ".join(f"{k}: {v}" for k, v in notes.items())


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write the table (``layer, method, target, metrics..., notes``); NaN as ``undefined``."""
    path = Path(path)
    header = ["layer", "method", "target", *columns, "notes"]
    with atomic_write(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([safe_cell(c) for c in header])
        for row in rows:
            out = []
            for c in header:
                v = row.get(c)
                if c == "notes":
                    out.append(notes_text(v or {}))
                elif isinstance(v, (float, np.floating)):
                    out.append(repr(float(v)) if math.isfinite(float(v)) else UNDEFINED)
                else:
                    out.append("" if v is None else str(v))
            w.writerow([safe_cell(c) for c in out])  # no cell a spreadsheet would run as a formula
    return path


def stage_layer_name(info: MapInfo, stage: int, stage_layer: str) -> str:
    """``method · stage k (layer)`` (napari adds ``[1]`` to repeats)."""
    return f"{info.label} · stage {stage} ({stage_layer})"
