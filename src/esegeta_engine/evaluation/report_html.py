"""HTML pieces of the report: sortable tables, cells with sort keys, the page's CSS and script."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TEXT_COLUMNS = ("volume", "method", "layer", "target", "status", "note", "mode", "verdict", "reason", "measure",
                "trust", "words", "randomisation", "axiom_status", "axiom_note")  # None shows as an empty cell
UNDEFINED = "undefined"

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}table.sortable th[data-dir=desc]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.undef{color:#999;font-style:italic}
tr[class]:not(.ok) td{background:#fff0f0}table{border-collapse:collapse;margin:.5em 0;font-size:13px}
.trust-low{color:#b00;font-weight:bold}.trust-high{color:#070;font-weight:bold}.trust-moderate{color:#a60}
.figs{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;max-width:100%}
img{max-width:100%;border:1px solid #ddd}figcaption{font-size:12px;color:#555}.note{color:#a60}code{font-size:12px}"""

# Click a header: sort by its data-v keys, numbers numerically, undefined (empty key) last.
JS = """document.querySelectorAll("table.sortable th").forEach(function (th) { th.onclick = function () {
  var t = th.closest("table"), body = t.tBodies[0], i = th.cellIndex, asc = th.dataset.dir !== "asc";
  t.querySelectorAll("th").forEach(function (h) { delete h.dataset.dir; }); th.dataset.dir = asc ? "asc" : "desc";
  Array.prototype.slice.call(body.rows).sort(function (a, b) {
    var x = a.cells[i].dataset.v, y = b.cells[i].dataset.v, nx = Number(x), ny = Number(y);
    if (x === y) return 0; if (x === "") return 1; if (y === "") return -1;
    var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y, undefined, {numeric: true});
    return asc ? c : -c; }).forEach(function (r) { body.appendChild(r); }); }; });"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _plain(v: Any) -> Any:
    """JSON-ready value: numpy scalars to Python, NaN to None."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_plain(x) for x in v]
    return v


def _cell(v: Any, text_column: bool = False) -> str:
    """``<td>`` with the shown text and a ``data-v`` sort key (empty: undefined, sorts last)."""
    v = _plain(v)
    if v is None:
        return '<td data-v=""></td>' if text_column else f'<td class="undef" data-v="">{UNDEFINED}</td>'
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f'<td data-v="{_e(v)}">{_e(v)}</td>'
    key = repr(v) if math.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")
    text = str(v) if isinstance(v, int) else f"{v:.4g}"
    return f'<td class="num" data-v="{key}">{_e(text)}</td>'


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, sortable: bool = False,
           row_class: str | None = None) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cls = f' class="{_e(r.get(row_class))}"' if row_class and r.get(row_class) else ""
        body.append(f"<tr{cls}>" + "".join(_cell(r.get(c), c in TEXT_COLUMNS) for c in columns) + "</tr>")
    attr = ' class="sortable"' if sortable else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>" + "\n".join(body) + "</tbody></table>"


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(UNDEFINED if _plain(v) is None else v)}</td></tr>"
                   for k, v in items.items())
    return f"<table><tbody>{rows}</tbody></table>"
