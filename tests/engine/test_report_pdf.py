"""The PDF for meetings (issue 19.9): a wide metrics table on one page, blank text cells for a method
without a model layer ("undefined" stays for undefined metrics), tall figures on portrait pages."""

from __future__ import annotations

import re

import numpy as np


def test_wide_table_on_one_page_and_tall_figure_portrait(tmp_path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from esegeta_engine.evaluation.report_pdf import _table_lines, write_pdf

    columns = ["method", "layer", *[f"metric_{i}" for i in range(24)]]
    rows = [{"method": m, "layer": None if m == "saliency" else "enc.3",
             **{f"metric_{i}": float(i) for i in range(24)}, "metric_5": None} for m in ("saliency", "grad_cam")]
    groups = _table_lines(rows, columns)
    assert len(groups) >= 2  # the columns need several groups...
    saliency = [line for g in groups for line in g if line.startswith("saliency")]
    assert all("undefined" not in line.split()[1] for line in saliency)  # ...the missing layer is blank
    assert any("undefined" in line for line in saliency)  # the undefined metric is still said
    fig = Figure(figsize=(3, 8))
    FigureCanvasAgg(fig)
    fig.add_subplot().imshow(np.zeros((8, 3)))
    tall = tmp_path / "grid.png"
    fig.savefig(tall)
    path = write_pdf(tmp_path / "r.pdf", "run", [], {"Metrics": (rows, columns)}, [tall])
    boxes = [tuple(float(v) for v in box.split()) for box in re.findall(rb"/MediaBox \[([^\]]*)\]", path.read_bytes())]
    assert len(boxes) == 3  # summary, the whole table, the figure
    (_, _, w0, h0), (_, _, w1, h1), (_, _, w2, h2) = boxes
    assert w0 > h0 and w1 > h1 and w2 < h2  # landscape text, portrait for the tall figure
