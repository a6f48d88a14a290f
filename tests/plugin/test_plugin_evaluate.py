"""The Evaluate widget on the phantom: metrics table, curves, randomisation stage layers, cancel."""

from __future__ import annotations

import csv
import math
import os
import time

import numpy as np
import torch
import pytest

from plugin_helpers import wait_until

pytestmark = pytest.mark.gui

SHOT = os.environ.get("ESEGETA_EVAL_SCREENSHOT")  # path: save the panel (docs)


def _load_and_explain(qtbot, w) -> list:
    mw = w["model"]
    mw.use_bundled()
    wait_until(qtbot, lambda: mw.session.model is not None or mw.status.property("status_kind") == "error", 60)
    assert mw.session.model is not None, mw.status.text()
    ex = w["explain"]
    ex.kind_combo.setCurrentText("argmax")
    ex.methods.check("saliency")
    ex.methods.check("integrated_gradients", n_steps=4)
    assert ex.run() is not None, ex.status.text()
    wait_until(qtbot, lambda: not ex.running, 120)
    # integrated gradients with 4 steps misses completeness: a warning (amber), not a success (green)
    assert ex.status.property("status_kind") == "warning", ex.status.text()
    assert "completeness" in ex.status.text() and "7fd17f" not in ex.status.styleSheet()
    return list(ex.added)


def _evaluate_widget(viewer):
    from napari_esegeta._qt.evaluate_widget import EvaluateWidget

    ev = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(ev, name="evaluate")
    return ev


def _same_geometry(layer, ref) -> None:
    for attr in ("scale", "translate", "rotate", "shear"):
        np.testing.assert_allclose(getattr(layer, attr), getattr(ref, attr))
    np.testing.assert_allclose(layer.affine.affine_matrix, ref.affine.affine_matrix)


def test_evaluate_panel(qtbot, make_docked, bundled_model, tmp_path):
    from napari_esegeta._sample_data import phantom_mask_data

    viewer, image, w = make_docked(show=bool(SHOT))
    maps = _load_and_explain(qtbot, w)
    assert len(maps) == 2
    data, kwargs, _ = phantom_mask_data((32,) * 3, 3)[0]
    gt = viewer.add_labels(data, **kwargs)
    assert gt.data.any()
    ev = _evaluate_widget(viewer)
    assert sorted(ly.name for ly in ev.checked_layers()) == sorted(maps)  # default: all result layers
    ev.gt_combo.setCurrentText(gt.name)
    ev.form.set_checked(infidelity=True, faithfulness=True, localisation=True, randomisation=True)
    ev.form.set_values("faithfulness", steps=5)
    ev.form.set_values("randomisation", mode="cascading", max_stages=2)
    n_before = len(viewer.layers)
    t0 = time.perf_counter()
    assert ev.run() is not None, ev.status.text()
    wait_until(qtbot, lambda: not ev.running, 300)
    took = time.perf_counter() - t0
    assert ev.status.property("status_kind") == "ok", ev.status.text()
    # one row per map, finite numbers where defined
    assert sorted(r["layer"] for r in ev.rows) == sorted(maps)
    assert ev.table.columnCount() == 2 and ev.table.rowCount() == len(ev.headers())  # a column per map
    for r in ev.rows:
        for key in ("infidelity", "auc_deletion", "auc_insertion", "aopc_deletion", "mass_inside",
                    "rank_accuracy", "pointing_game", "roc_auc", "mean_spearman_abs"):
            assert math.isfinite(r[key]), (key, r)
        assert r["randomisation"] in ("pass", "fail")
    cells = ev.table_text()
    headers = ev.headers()
    assert all(c[headers.index("randomisation")] in ("pass", "fail") for c in cells)
    assert not any("undefined" in c[headers.index("infidelity")] for c in cells)
    # sortable: the maps ordered by infidelity (a click on the row's title), then reversed (a second click)
    row = headers.index("infidelity")
    ev.table.verticalHeader().sectionClicked.emit(row)
    vals = [float(c[row]) for c in ev.table_text()]
    assert vals == sorted(vals)
    ev.table.verticalHeader().sectionClicked.emit(row)
    assert [float(c[row]) for c in ev.table_text()] == sorted(vals, reverse=True)
    # curves: deletion + insertion per map
    assert ev.curves_canvas.lines_drawn == 4 and set(ev.curves) == set(maps)
    # stage layers: 2 per map, on the input's grid and geometry, named method · stage k (layer)
    assert len(viewer.layers) == n_before + 4 == n_before + len(ev.added)
    for name in ev.added:
        layer = viewer.layers[name]
        meta = layer.metadata["esegeta"]
        assert name.startswith(f"{meta['label']} · stage {meta['randomisation_stage']} (")
        assert layer.data.shape == image.data.shape
        _same_geometry(layer, image)
        assert meta["source_layer"] in maps
    # the Compare widget lists the stage layers (original vs stage k)
    w["compare"].refresh()
    assert set(ev.added) <= {ly.name for ly in w["compare"].result_layers()}
    # CSV export
    out = ev.export_csv(tmp_path / "eval.csv")
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and all(float(r["infidelity"]) == float(r["infidelity"]) for r in rows)
    print(f"evaluation took {took:.1f} s")
    if SHOT:
        ev.setMinimumWidth(560)
        qtbot.wait(300)
        ev.grab().save(SHOT)


class _Counting(torch.nn.Module):
    """The session's model, counting forward passes that start after Cancel was clicked."""

    def __init__(self, net, cancel_event) -> None:
        super().__init__()
        self.net = net
        self.counts = {"calls": 0, "after_cancel": 0}
        self._cancel = cancel_event

    def forward(self, x):
        self.counts["calls"] += 1
        if self._cancel().is_set():
            self.counts["after_cancel"] += 1
        return self.net(x)


def test_evaluate_cancel_and_undefined(qtbot, docked, bundled_model):
    """Cancel during randomisation: no model evaluation starts after it (counted, not timed), every
    metric row done before it stays; the latency is measured by benchmarks/bench_meeting_flow.py."""
    viewer, image, w = docked
    maps = _load_and_explain(qtbot, w)
    ev = _evaluate_widget(viewer)
    s = ev.session
    counting = _Counting(s.model, lambda: ev.control.event)
    s.set_model(counting, s.model_name, s.preprocess, s.output, s.class_names)
    ev.form.set_checked(infidelity=True, faithfulness=False, randomisation=True,
                        localisation=True)  # no ground truth chosen: undefined, with the reason
    ev.form.set_values("randomisation", max_stages=20)
    assert ev.run() is not None, ev.status.text()
    wait_until(qtbot, lambda: "randomisation" in ev.last_message or not ev.running, 300)
    assert ev.running, ev.status.text()
    wait_until(qtbot, lambda: counting.counts["calls"] > 0 and ev.control._latest is not None, 60)
    ev.cancel()
    calls_at_cancel = counting.counts["calls"]
    wait_until(qtbot, lambda: not ev.running, 120)
    # at most the evaluation that had passed its cancel check as the button was clicked
    assert counting.counts["after_cancel"] <= 1, counting.counts
    assert counting.counts["calls"] <= calls_at_cancel + 1
    assert "cancelled" in ev.status.text()
    # the metric rows done before the cancel are kept
    assert sorted(r["layer"] for r in ev.rows) == sorted(maps)
    headers = ev.headers()
    for cells, r in zip(ev.table_text(), ev.rows):
        assert cells[headers.index("mass_inside")] == "undefined"
        assert "ground-truth" in cells[headers.index("notes")]
        assert math.isfinite(r["infidelity"])
    # the viewer keeps working and a new run can start
    assert not ev.session.busy and ev.run_btn.isEnabled()


def test_evaluate_errors_are_readable(qtbot, docked):
    viewer, image, w = docked
    ev = _evaluate_widget(viewer)
    assert ev.run() is None  # no model
    assert ev.status.property("status_kind") == "error" and "no model" in ev.status.text()
    assert not ev.running and ev.run_btn.isEnabled()
