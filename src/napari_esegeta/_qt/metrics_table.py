"""The Evaluate tab's scores: one column per map, one row per field, fitting the dock's width.

A map per row and a metric per column made a table ten or more columns wide in a dock about 370 px
wide at 1366×768: its last columns (the notes, most scores) could only be reached by scrolling sideways
(issue 19). Here each map is a column (its ``method · target`` in the column title, elided in the middle,
the full name in its tooltip) and each field a row (``method``, ``target``, the metrics, ``notes``). The
columns share the table's width, so nothing scrolls sideways: a value too long for its column is elided
in the middle, its full text in the cell's tooltip; notes wrap. Clicking a row's title orders the maps by
that field (numbers as numbers, undefined last; a second click reverses it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem, QWidget

from napari_esegeta import _eval_table as T


def _sort_key(value: Any) -> tuple[int, float | str]:
    """Numbers first, in order; then text; undefined (NaN, None) last."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (2, 0.0) if math.isnan(value) else (0, float(value))
    return (2, 0.0) if value is None else (1, str(value))


class MetricsTable(QTableWidget):
    """Scores of the evaluated maps: a column per map, a row per field.

    Parameters
    ----------
    tip : callable
        ``tip(row, key) -> str``: the tooltip of a cell (the note that explains it).
    """

    def __init__(self, tip: Any, parent: QWidget | None = None) -> None:
        super().__init__(0, 0, parent)
        self._tip = tip
        self.fields: list[str] = []
        self.maps: list[dict[str, Any]] = []
        self._order: tuple[str, bool] | None = None
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectColumns)
        self.setMinimumHeight(120)
        self.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.setWordWrap(True)  # the notes
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.horizontalHeader().setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.horizontalHeader().setMinimumSectionSize(40)
        self.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.verticalHeader().setSectionsClickable(True)
        self.verticalHeader().sectionClicked.connect(lambda i: self.sort_by(self.fields[i]))
        self.verticalHeader().setToolTip("Click a row's title to order the maps by it")

    def start(self, fields: Sequence[str]) -> None:
        """Empty the table for a run with these fields (``method, target, metrics…, notes``)."""
        self.fields, self.maps, self._order = list(fields), [], None
        self.clear()
        self.setColumnCount(0)
        self.setRowCount(len(self.fields))
        self.setVerticalHeaderLabels([f.replace("_", " ") for f in self.fields])

    def add(self, row: dict[str, Any]) -> None:
        """One map's scores, as a new column."""
        self.maps.append(row)
        self._fill()

    def update_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """New values for maps already shown (randomisation's verdicts arrive later)."""
        by_layer = {r["layer"]: r for r in rows}
        self.maps = [by_layer.get(m["layer"], m) for m in self.maps]
        self._fill()

    def sort_by(self, key: str, descending: bool | None = None) -> None:
        """Order the map columns by ``key`` (a second call for the same key reverses the order)."""
        if descending is None:
            descending = self._order is not None and self._order == (key, False)
        self._order = (key, descending)
        numbers = [m for m in self.maps if _sort_key(m.get(key))[0] < 2]
        undefined = [m for m in self.maps if _sort_key(m.get(key))[0] == 2]
        self.maps = sorted(numbers, key=lambda m: _sort_key(m.get(key)), reverse=descending) + undefined
        self._fill()

    def text(self) -> list[list[str]]:
        """The cells as shown, one list per map (in ``fields`` order)."""
        return [[self.item(i, j).text() for i in range(self.rowCount())] for j in range(self.columnCount())]

    def _fill(self) -> None:
        self.setColumnCount(len(self.maps))
        for j, row in enumerate(self.maps):
            title = QTableWidgetItem(row["layer"])
            title.setToolTip(row["layer"])
            self.setHorizontalHeaderItem(j, title)
            notes = row.get("notes", {})
            for i, key in enumerate(self.fields):
                value = T.notes_text(notes) if key == "notes" else row.get(key)
                item = QTableWidgetItem(T.format_value(value))
                if isinstance(value, (int, float)) and not isinstance(value, bool):  # numbers line up
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                tip = self._tip(row, key)
                shown = T.format_value(value)
                if isinstance(value, float):
                    shown = repr(value)
                item.setToolTip("\n".join(t for t in (shown if key != "notes" else "", tip) if t))
                item.setData(Qt.ItemDataRole.UserRole, row["layer"])
                self.setItem(i, j, item)
        self.resizeRowsToContents()
