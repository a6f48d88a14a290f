"""Every CSV the engine writes escapes spreadsheet formula prefixes; numbers stay numbers."""

from __future__ import annotations

import csv
import json

import pytest

from esegeta_engine.cohort import aggregate
from esegeta_engine.evaluation import report
from esegeta_engine.tables import FORMULA_PREFIXES, csv_text, safe_cell

HOSTILE = ['=HYPERLINK("http://x","y")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\t=1+1", "\r=1+1"]


@pytest.mark.parametrize("text", HOSTILE)
def test_formula_prefixes_are_quoted(text):
    assert text.startswith(FORMULA_PREFIXES)
    assert safe_cell(text) == "'" + text


@pytest.mark.parametrize("value", [-0.5, "-0.5", "+3", "-1e-3", " -2", 7, None, "sub-01", "", "a=b", float("nan")])
def test_numbers_and_plain_text_are_unchanged(value):
    out = safe_cell(value)
    assert out is value or out == value


def _read(path):
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_cohort_table_escapes_cells_and_keeps_numbers(tmp_path):
    rows = [{"subject": HOSTILE[0], "group": "@evil", "model": "=cmd", "score": -0.5, "text_num": "-0.25"},
            {"subject": "sub-02", "group": "-x", "model": "base", "score": 1.0, "text_num": "3"}]
    path = aggregate._write_csv(tmp_path / "cohort_metrics.csv", rows)
    header, first, second = _read(path)
    assert header == ["subject", "group", "model", "score", "text_num"]
    assert first == ["'" + HOSTILE[0], "'@evil", "'=cmd", "-0.5", "-0.25"]
    assert second == ["sub-02", "'-x", "base", "1.0", "3"]


def test_metrics_export_escapes_cells(tmp_path):
    columns = ["file", "method", "auc_deletion", "note"]
    rows = [{"file": "=1+1.nii.gz", "method": "saliency", "auc_deletion": -0.5, "note": "+danger"}]
    report._write_numbers(tmp_path, rows, columns)
    header, row = _read(tmp_path / "metrics.csv")
    assert header == columns and row == ["'=1+1.nii.gz", "saliency", "-0.5", "'+danger"]
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"][0]["file"] == "=1+1.nii.gz"  # data kept


def test_evaluate_tab_export_escapes_cells(tmp_path):
    from napari_esegeta._eval_table import write_csv

    path = write_csv(tmp_path / "t.csv", [{"layer": "=evil", "method": "saliency", "target": "-t", "m": -0.5,
                                           "notes": {"a": "b"}}], ["m"])
    header, row = _read(path)
    assert row[:4] == ["'=evil", "saliency", "'-t", "-0.5"]


def test_csv_text_escapes_header_and_cells():
    text = csv_text(["=h", "n"], [["@x", -1.5]], lineterminator="\n")
    assert text == "'=h,n\n'@x,-1.5\n"
