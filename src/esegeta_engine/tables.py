"""CSV cells that a spreadsheet shows as text, never runs as a formula.

Spreadsheets treat a cell starting with ``=``, ``+``, ``-`` or ``@`` (and, in some, a tab
or a carriage return before one) as a formula: a subject id, file name or error message
copied from a received CSV or folder could then run ``=HYPERLINK(...)`` or worse when a
colleague opens the engine's table ("CSV injection"). Every CSV the engine writes passes
its cells through :func:`safe_cell`, which prefixes such text with a single quote (the
OWASP rule) and leaves numbers — ``-0.5`` as a float or as text — as they are.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def safe_cell(value: Any) -> Any:
    """``value`` unchanged, unless it is text a spreadsheet would read as a formula (then ``'`` + text)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES) and not _is_number(value.strip()):
        return "'" + value
    return value


def safe_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A dict row with every cell passed through :func:`safe_cell`."""
    return {k: safe_cell(v) for k, v in row.items()}


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]], lineterminator: str = "\r\n") -> str:
    """CSV text of ``header`` and list ``rows``, every cell escaped."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=lineterminator)
    w.writerow([safe_cell(h) for h in header])
    for row in rows:
        w.writerow([safe_cell(c) for c in row])
    return buf.getvalue()
