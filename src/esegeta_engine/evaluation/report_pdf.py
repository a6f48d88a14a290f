"""The report as a PDF for meetings: the trust summary, every table, every figure.

Written with matplotlib's PDF backend on :class:`~matplotlib.figure.Figure` objects (no
pyplot, no display): A4 landscape pages of wrapped text; monospaced tables whose column groups are stacked on
one page (a table continues on the next page only when its rows do not fit); one figure per
page, on a portrait page when the figure is taller than wide, so a comparison grid of many
methods is not shrunk. Text columns without a value (a method without a model layer) are
blank, not "undefined", which is kept for metrics that are undefined.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from esegeta_engine.errors import EsegetaError
from esegeta_engine.io import atomic_write

__all__ = ["write_pdf"]

PAGE = (11.69, 8.27)  # A4 landscape, inches
LINES = 52  # text lines per page at FONT points
FONT = 7.5
WIDTH = 165  # characters per line
CELL = 14  # characters per table cell


#: columns that hold names, not measurements: no value there is blank
TEXT = ("volume", "method", "layer", "target", "status", "note", "notes", "mode", "noise_tunnel", "file", "stage")


def _fmt(v: Any, column: str = "") -> str:
    if v is None and column in TEXT:
        return "–"
    if v is None or isinstance(v, float) and math.isnan(v):
        return "undefined"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _text_pages(pdf: Any, figure: type, heading: str, lines: Sequence[str]) -> None:
    for start in range(0, max(len(lines), 1), LINES):
        fig = figure(figsize=PAGE)
        fig.text(0.03, 0.96, heading if start == 0 else f"{heading} (continued)", fontsize=12, weight="bold",
                 va="top")
        fig.text(0.03, 0.92, "\n".join(lines[start:start + LINES]), fontsize=FONT, family="monospace", va="top")
        pdf.savefig(fig)


def _table_lines(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[list[str]]:
    """Column groups that fit a line, each as text lines (header first)."""
    per_group = max(1, WIDTH // (CELL + 1))
    fixed = [c for c in columns[:2]]
    rest = [c for c in columns if c not in fixed]
    groups = [fixed + rest[i:i + per_group - len(fixed)] for i in range(0, max(len(rest), 1), per_group - len(fixed))]
    out = []
    for cols in groups:
        def cell(text: str) -> str:
            return (text if len(text) <= CELL else text[:CELL - 1] + "…").ljust(CELL)

        lines = [" ".join(cell(c) for c in cols), " ".join("-" * CELL for _ in cols)]
        lines += [" ".join(cell(_fmt(r.get(c), c)) for c in cols) for r in rows]
        out.append(lines)
    return out


def write_pdf(path: Path, title: str, summaries: Sequence[Mapping[str, Any]],
              tables: Mapping[str, tuple[Sequence[Mapping[str, Any]], Sequence[str]]],
              figures: Sequence[Path]) -> Path:
    """Write ``path`` (atomically): summary pages, table pages, figure pages.

    Raises
    ------
    EsegetaError
        When matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_pdf import PdfPages
        from matplotlib.figure import Figure
        from matplotlib.image import imread
    except ImportError:  # pragma: no cover - optional dependency
        raise EsegetaError("the PDF report needs matplotlib",
                           "pip install 'napari-esegeta[report]' (or matplotlib)") from None
    with atomic_write(path) as tmp, PdfPages(tmp) as pdf:
        lines: list[str] = []
        for s in summaries:
            lines += textwrap.wrap(f"{s['method']} · {s['target']} · {s['volume']}: trust {s['trust']}. "
                                   f"{s['words']}", WIDTH, subsequent_indent="    ") + [""]
        _text_pages(pdf, Figure, f"{title} — how far to trust each map", lines or ["no maps"])
        for name, (rows, columns) in tables.items():
            stacked: list[str] = []
            for group in _table_lines(rows, columns):  # column groups one under the other, on one page
                stacked += group + [""]
            _text_pages(pdf, Figure, name, stacked[:-1])
        for png in figures:
            if not png.is_file():
                continue
            image = imread(str(png))
            fig = Figure(figsize=PAGE if image.shape[1] >= image.shape[0] else PAGE[::-1])
            ax = fig.add_axes((0.02, 0.02, 0.96, 0.92))
            ax.imshow(image)
            ax.set_axis_off()
            fig.text(0.02, 0.97, png.name, fontsize=9, va="top")
            pdf.savefig(fig)
        info = pdf.infodict()
        info["Title"] = title
    return path
