"""One orientation convention: the report's figures and the plugin's views agree (issue 19.4).

An oblique, flipped and axis-permuted NIfTI is opened in napari through the plugin's reader and
drawn by the report's figure code; in the axial, coronal and sagittal views the edge letters are
the same, and a blob at the patient's right / anterior / superior end lands on the edge that
letter names in the report's images.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.gui

SHAPE = (18, 22, 14)
PLUGIN_EDGES = {"top_center": "top", "bottom_center": "bottom", "middle_left": "left", "middle_right": "right"}


def _oblique_flipped_affine() -> np.ndarray:
    """Voxel axes (i, j, k) -> world (-y, x, z) (permuted, one flipped), rotated 20° and 10°, anisotropic."""
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    perm = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ perm @ np.diag([1.2, 0.9, 1.6])
    aff[:3, 3] = (5.0, -7.0, 3.0)
    return aff


def _world(affine: np.ndarray) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    return (idx @ affine[:3, :3].T + affine[:3, 3]).reshape(*SHAPE, 3)


def test_report_and_plugin_letters_agree_on_an_oblique_flipped_nifti(make_napari_viewer, tmp_path) -> None:
    from esegeta_engine.evaluation.figures import axis_codes, display_views
    from napari_esegeta._view import PLANES, show_plane, track_orientation_letters, update_orientation_letters

    affine = _oblique_flipped_affine()
    assert axis_codes(affine) == ("P", "R", "S")  # not RAS: permuted and flipped
    volume = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)

    # the report: letters and where a blob at each anatomical end is drawn
    world = _world(affine)
    report = {v["name"]: v for v in display_views(volume, np.zeros(SHAPE), affine=affine)}
    for axis, letter in enumerate("RAS"):
        blob = (world[..., axis] >= np.quantile(world[..., axis], 0.97)).astype(np.float32)
        for view in display_views(volume, blob, affine=affine):
            letters = view["letters"]
            rows, cols = np.nonzero(view["map"] > 0)
            h, w = view["map"].shape
            if letters["left"] == letter:
                assert cols.mean() < w / 2 - 1, (view["name"], letter)
            if letters["right"] == letter:
                assert cols.mean() > w / 2 + 1, (view["name"], letter)
            if letters["top"] == letter:
                assert rows.mean() < h / 2 - 1, (view["name"], letter)

    # the plugin: the same file through its reader, the radiological planes and their canvas letters
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-esegeta")
    track_orientation_letters(viewer)
    for plane in PLANES:
        show_plane(viewer, plane)
        shown = update_orientation_letters(viewer)
        plugin = {PLUGIN_EDGES[k]: v for k, v in shown.items()}
        assert plugin == report[plane]["letters"], (plane, plugin, report[plane]["letters"])
    assert report["axial"]["letters"]["left"] == "R" and report["sagittal"]["letters"]["left"] == "A"


def test_the_letters_add_only_their_text_to_each_canvas_draw(make_napari_viewer, monkeypatch) -> None:
    """The four edge letters are drawn in every frame (issue 19, event-loop gaps): napari's text overlay draws a
    background box (a mesh and its border line) by default, 20-60 ms a box with software OpenGL in the frame after
    a layer is added (the overlays are re-placed), so a map's insertion drew 8 more visuals than bare napari.
    Counted on vispy's draws of one frame, with and without the letters: they add their four texts, nothing else."""
    from vispy.visuals import visual as vispy_visual

    from napari_esegeta._sample_data import phantom_volume_data
    from napari_esegeta._view import LETTER_POSITIONS, _LETTER_KEY, update_orientation_letters

    viewer = make_napari_viewer(show=True)
    data, kwargs, _ = phantom_volume_data((16, 16, 16), 3)[0]
    viewer.add_image(data, **kwargs)
    drawn: list[str] = []
    real = vispy_visual.Visual.draw

    def counted(self):
        if self.visible:
            drawn.append(type(self).__name__)
        return real(self)

    monkeypatch.setattr(vispy_visual.Visual, "draw", counted)
    canvas = viewer.window._qt_viewer.canvas._scene_canvas

    def frame() -> list[str]:
        drawn.clear()
        canvas.render()
        return sorted(drawn)

    before = frame()
    assert update_orientation_letters(viewer)  # a NIfTI-geometry scan in 2D: the letters are shown
    letters = [viewer.canvas.overlays[_LETTER_KEY + pos] for pos in LETTER_POSITIONS]
    assert all(overlay.visible and not overlay.box for overlay in letters)
    after = frame()
    added = list(after)
    for name in before:
        added.remove(name)
    assert sorted(added) == ["Text"] * 4, added
