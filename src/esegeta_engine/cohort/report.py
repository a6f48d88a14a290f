"""``cohort_report.html``: the aggregate maps as MIP figures and the cohort tables, in one page."""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from esegeta_engine.cohort.plan import CohortPlan
from esegeta_engine.io import write_text
from esegeta_engine.jobs.naming import slug as _slug

REPORT = "cohort_report.html"


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)

    def cell(v: Any) -> str:
        try:
            return f"{float(v):.4g}" if v not in (None, "") and not str(v).isdigit() and "." in str(v) else str(v)
        except (TypeError, ValueError):
            return str(v)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_cohort_report(out: Path, plan: CohortPlan, records: list[dict[str, Any]],
                        cohort: dict[str, Any]) -> Path:
    """Write the report next to the results; MIPs of each aggregate mean over the first subject's image."""
    from esegeta_engine.evaluation.figures import mip_figure

    parts = [f"<h1>Cohort: {len(plan.volumes)} subjects, {len(records)} jobs</h1>",
             f"<p>{html.escape(plan.grid_note)}. Normalisation: {html.escape(cohort['normalisation'])}.</p>"]
    if cohort["aggregates"]:
        grey = np.asarray(nib.load(str(plan.volumes[0].path)).dataobj, dtype=np.float32)
        spacing = tuple(float(s) for s in np.linalg.norm(plan.volumes[0].affine[:3, :3], axis=0))
        parts.append("<h2>Class-wise aggregate maps (mean of normalised maps)</h2>")
        for a in cohort["aggregates"]:
            mean = np.asarray(nib.load(str(out / a["mean"])).dataobj, dtype=np.float32)
            fig = out / "figures" / f"aggregate__{a['model']}__{_slug(a['method'])}__{a['class']}.png"
            mip_figure(grey, mean, fig, title=f"{a['model']} · {a['method']} · class {a['class']} "
                       f"(n={a['n']})", spacing=spacing[: grey.ndim])
            parts.append(f"<figure><img src='{html.escape(str(fig.relative_to(out)))}' width='720'>"
                         f"<figcaption>{html.escape(a['mean'])}; spread: {html.escape(a['std'])}"
                         "</figcaption></figure>")
    if cohort["comparisons"]:
        parts += ["<h2>Model vs model (difference of aggregate means)</h2>",
                  _table([{**c, "models": " - ".join(c["models"])} for c in cohort["comparisons"]])]
    tables = cohort["tables"]
    for title, key in (("Group summaries", "groups"), ("Paired metrics", "paired"), ("All jobs", "table")):
        if key in tables:
            parts += [f"<h2>{title}</h2>", _table(_csv(out / tables[key]))]
    page = ("<!doctype html><meta charset='utf-8'><title>esegeta cohort</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:2px 6px}</style>" + "\n".join(parts))
    path = out / REPORT
    return write_text(page, path)
