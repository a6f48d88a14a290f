"""The Cohort panel: open a cohort run folder, pick subject / model / method, subject map beside the mean."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.gui

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    from cohort_helpers import cohort_data, write_phantoms

    from esegeta_engine.cohort import parse_cohort_config, run_cohort

    tmp = tmp_path_factory.mktemp("cohort")
    write_phantoms(tmp / "data", n=2)
    data = cohort_data(tmp)
    data["methods"] = data["methods"][:2]
    run_cohort(parse_cohort_config(data))
    return tmp / "out"


def test_cohort_panel_shows_subject_map_beside_the_aggregate(make_napari_viewer, cohort_run, qtbot):
    from napari_esegeta._qt.cohort_widget import CohortWidget

    viewer = make_napari_viewer()
    w = CohortWidget(viewer)
    w.open_folder(str(cohort_run))
    assert [w.subject.itemText(i) for i in range(w.subject.count())] == ["sub00", "sub01"]
    assert [w.model.itemText(i) for i in range(w.model.count())] == ["base", "tuned"]
    assert w.method.count() == 2 and w.show_btn.isEnabled()
    w.subject.setCurrentText("sub01")
    w.model.setCurrentText("tuned")
    w.method.setCurrentText("input_x_gradient · class 1")
    assert w.show_selection() is not None
    qtbot.waitUntil(lambda: not w.running, timeout=60000)
    image, subject_map, mean = w.shown
    manifest = json.loads((cohort_run / "manifest.json").read_text())
    rec = next(r for r in manifest["results"] if (r["subject"], r["model"], r["method"])
               == ("sub01", "tuned", "input_x_gradient"))
    agg = next(a for a in manifest["cohort"]["aggregates"] if (a["model"], a["method"])
               == ("tuned", "input_x_gradient"))
    np.testing.assert_array_equal(subject_map.data, np.asarray(nib.load(cohort_run / rec["file"]).dataobj))
    np.testing.assert_array_equal(mean.data, np.asarray(nib.load(cohort_run / agg["mean"]).dataobj))
    # same world geometry for all three (the NIfTI affine as the layer transform)
    for layer in (subject_map, mean):
        np.testing.assert_allclose(layer.affine.affine_matrix, image.affine.affine_matrix)
        np.testing.assert_allclose(layer.scale, image.scale)
    assert viewer.grid.enabled and "cohort mean" in mean.name


def test_cohort_panel_refuses_a_folder_without_a_cohort(make_napari_viewer, tmp_path):
    from napari_esegeta._qt.cohort_widget import CohortWidget

    w = CohortWidget(make_napari_viewer())
    w.open_folder(str(tmp_path))
    assert "no manifest.json" in w.status.text() and not w.show_btn.isEnabled()
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "completed", "results": []}))
    w.open_folder(str(tmp_path))
    assert "not a cohort run" in w.status.text()


def test_cohort_panel_reads_the_nifti_files_off_the_gui_thread(make_napari_viewer, cohort_run, qtbot, monkeypatch):
    """The subject's image, its map and the cohort mean are read (and their layer statistics built) in a
    worker thread: the GUI thread only adds the layers (issue 19, second pass)."""
    import threading

    import napari_esegeta._cohort as C
    import napari_esegeta._layers as L
    from napari_esegeta._qt.cohort_widget import CohortWidget

    reads: list[bool] = []  # per call: on the GUI (main) thread?
    for module, name in ((C, "load_volume"), (L, "support_limit")):
        original = getattr(module, name)

        def spy(*args, _f=original, **kwargs):
            reads.append(threading.current_thread() is threading.main_thread())
            return _f(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    viewer = make_napari_viewer()
    w = CohortWidget(viewer)
    w.open_folder(str(cohort_run))
    assert w.show_selection() is not None
    assert not w.show_btn.isEnabled() and w.show_selection() is None  # one read at a time
    qtbot.waitUntil(lambda: not w.running, timeout=60000)
    assert len(w.shown) == 3 and w.show_btn.isEnabled()
    assert len(reads) == 5 and not any(reads)  # three files and two maps' contrast limits, none on the GUI thread


def test_cohort_panel_names_a_missing_map_from_the_worker(make_napari_viewer, cohort_run, qtbot, monkeypatch):
    from napari_esegeta._qt.cohort_widget import CohortWidget

    w = CohortWidget(make_napari_viewer())
    w.open_folder(str(cohort_run))
    monkeypatch.setattr(w.run, "map_file", lambda *a: None)
    w.show_selection()
    qtbot.waitUntil(lambda: not w.running, timeout=60000)
    assert w.shown == [] and "no map of" in w.status.text() and w.status.property("status_kind") == "error"
