"""Fault matrix in the plugin (issue 10): a pickled model loads only after the user confirms a
dialog naming the file; a NIfTI with a singular affine is refused by the reader with a message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from plugin_helpers import wait_until

pytestmark = pytest.mark.gui


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pickled code ran",))


@pytest.fixture
def model_widget(make_napari_viewer):
    from napari_esegeta._qt.model_widget import ModelWidget

    return ModelWidget(make_napari_viewer())


def _load(qtbot, mw, path: Path) -> None:
    mw.path_edit.setText(str(path))
    mw.class_edit.setText("")
    mw.load()
    wait_until(qtbot, lambda: mw.load_btn.isEnabled() and mw._worker is not None
               and not mw._worker.is_running, 30)


def test_pickled_model_needs_a_confirmation_naming_the_file(qtbot, model_widget, tmp_path, monkeypatch):
    import napari_esegeta._qt.model_widget as mwmod
    from tiny_models import TinySegNet

    marker = tmp_path / "MARKER"
    torch.save(_Payload(marker), tmp_path / "evil.pt")
    asked: list[str] = []
    monkeypatch.setattr(mwmod, "confirm_pickled", lambda parent, path: asked.append(path) or False)
    _load(qtbot, model_widget, tmp_path / "evil.pt")
    wait_until(qtbot, lambda: model_widget.status.property("status_kind") == "error", 30)
    assert asked == [str(tmp_path / "evil.pt")] and not marker.exists()
    assert model_widget.session.model is None and "Traceback" not in model_widget.status.text()

    torch.save(TinySegNet(3), tmp_path / "whole.pt")  # a whole pickled module the user trusts
    monkeypatch.setattr(mwmod, "confirm_pickled", lambda parent, path: asked.append(path) or True)
    model_widget.path_edit.setText(str(tmp_path / "whole.pt"))
    model_widget.load()
    wait_until(qtbot, lambda: model_widget.session.model is not None, 30)
    assert asked[-1] == str(tmp_path / "whole.pt")


def test_reader_refuses_a_singular_affine_with_a_message(tmp_path, monkeypatch):
    import napari.utils.notifications as notifications

    from matrix_setup import raw_nifti
    from napari_esegeta._reader import napari_get_reader

    path = raw_nifti(tmp_path / "flat.nii", (8, 10, 6), np.diag([1.0, 1.0, 0.0, 1.0]))
    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", shown.append)
    assert napari_get_reader(str(path))(str(path)) == [(None,)]
    assert len(shown) == 1 and "singular" in shown[0] and "→" in shown[0]
