"""Reader, writer, bad files and the npe2 manifest."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from plugin_helpers import layer_world_of_voxel

pytestmark = pytest.mark.gui

FLIPPED_ANISO = np.array([[-0.4, 0.0, 0.0, 30.0],
                          [0.0, 0.7, 0.0, -12.5],
                          [0.0, 0.0, 1.3, -40.0],
                          [0.0, 0.0, 0.0, 1.0]])


def _oblique() -> np.ndarray:
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.5, -0.8, 1.2])
    aff[:3, 3] = [-10.0, 4.0, 7.5]
    return aff


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


@pytest.fixture
def notifications():
    """Error notifications napari shows during the test."""
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


@pytest.mark.parametrize("affine", [FLIPPED_ANISO, _oblique()], ids=["flipped-anisotropic", "oblique"])
def test_reader_world_coordinates_match_affine(make_napari_viewer, tmp_path, affine):
    rng = np.random.default_rng(0)
    data = rng.random((12, 10, 8)).astype(np.float32)
    path = _save(tmp_path / "vol.nii.gz", data, affine)
    viewer = make_napari_viewer()
    [layer] = viewer.open(path, plugin="napari-esegeta")
    assert layer.data.shape == (12, 10, 8)  # nibabel (x, y, z) order kept
    np.testing.assert_array_equal(layer.data, data)
    for ijk in [(0, 0, 0), (11, 0, 0), (3, 7, 5), (11, 9, 7)]:
        expected = affine[:3, :3] @ np.array(ijk, float) + affine[:3, 3]
        np.testing.assert_allclose(layer_world_of_voxel(layer, ijk), expected, atol=1e-9)
    np.testing.assert_allclose(layer.metadata["nifti"]["affine"], affine)
    assert nib.Nifti1Header(binaryblock=layer.metadata["nifti"]["header"]).get_xyzt_units()[0] == "mm"
    if affine is FLIPPED_ANISO:  # axis-aligned -> scale / translate, flips as negative scale
        np.testing.assert_allclose(layer.scale, [-0.4, 0.7, 1.3])
        np.testing.assert_allclose(layer.affine.affine_matrix, np.eye(4))


@pytest.mark.parametrize("affine", [FLIPPED_ANISO, _oblique()], ids=["flipped-anisotropic", "oblique"])
def test_writer_round_trip(make_napari_viewer, tmp_path, affine):
    data = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    src = _save(tmp_path / "in.nii.gz", data, affine)
    viewer = make_napari_viewer()
    [layer] = viewer.open(src, plugin="napari-esegeta")
    written = viewer.layers.save(str(tmp_path / "out.nii.gz"), selected=False, plugin="napari-esegeta")
    out = nib.load(written[0])
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.dataobj), data)
    assert out.header.get_xyzt_units()[0] == "mm"


def test_writer_rebuilds_geometry_without_metadata(tmp_path):
    from napari_esegeta._writer import write_nifti

    data = np.ones((4, 4, 4), np.float32)
    path = write_nifti(tmp_path / "plain", data, {"scale": (2.0, -1.0, 0.5), "translate": (1.0, 2.0, 3.0)})[0]
    assert path.endswith(".nii.gz")
    expected = np.diag([2.0, -1.0, 0.5, 1.0])
    expected[:3, 3] = [1, 2, 3]
    np.testing.assert_allclose(nib.load(path).affine, expected)


def test_labels_round_trip(make_napari_viewer, tmp_path, phantom):
    src = _save(tmp_path / "vessel_mask.nii.gz", phantom.mask.astype(np.uint8), phantom.affine)
    viewer = make_napari_viewer()
    [layer] = viewer.open(src, plugin="napari-esegeta")
    assert type(layer).__name__ == "Labels"
    written = viewer.layers.save(str(tmp_path / "mask_out.nii.gz"), selected=False, plugin="napari-esegeta")
    out = nib.load(written[0])
    np.testing.assert_array_equal(np.asarray(out.dataobj), phantom.mask)
    np.testing.assert_allclose(out.affine, phantom.affine)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    truncated = tmp_path / "truncated.nii"
    _save(truncated, np.ones((8, 8, 8), np.float32), np.eye(4))
    truncated.write_bytes(truncated.read_bytes()[:400])
    four_d = _save(tmp_path / "series.nii.gz", np.ones((8, 8, 8, 3), np.float32), np.eye(4))
    return {"corrupt": corrupt, "truncated": truncated, "4d": four_d}


def test_bad_nifti_files_notify_and_keep_layers(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    keep = viewer.add_image(np.zeros((4, 4, 4)), name="existing")
    for kind, path in _bad_files(tmp_path).items():
        added = viewer.open(path, plugin="napari-esegeta")
        assert added == [], kind
        assert list(viewer.layers) == [keep], kind
    texts = [str(n.message) for n in notifications]
    assert len(texts) == 3
    assert any("corrupt" in t and "→" in t for t in texts)  # problem and fix
    assert any("(8, 8, 8, 3)" in t and "4D" in t for t in texts)
    assert all("Traceback" not in t for t in texts)


def test_reader_declines_non_nifti(tmp_path):
    from napari_esegeta._reader import napari_get_reader

    (tmp_path / "x.tif").write_bytes(b"II*\x00")
    assert napari_get_reader(str(tmp_path / "x.tif")) is None
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.nii")]) is None
    assert napari_get_reader(str(tmp_path / "a.NII.GZ")) is not None


def test_read_nifti_raises_readable_error(tmp_path):
    from esegeta_engine.errors import VolumeError
    from napari_esegeta._reader import read_nifti

    with pytest.raises(VolumeError) as info:
        read_nifti(_bad_files(tmp_path)["4d"])
    assert info.value.fix


def test_manifest_validates():
    npe2 = Path(sys.executable).with_name("npe2")
    res = subprocess.run([str(npe2), "validate", "napari-esegeta"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in res.stdout


def test_top_level_manifest_is_the_package_manifest():
    root = Path(__file__).resolve().parents[2]
    assert (root / "napari.yaml").read_text() == (root / "src/napari_esegeta/napari.yaml").read_text()


def test_sample_data_commands(make_napari_viewer, phantom):
    from napari_esegeta import _sample_data as S

    [(vol, kw, kind)] = S.phantom()
    assert kind == "image" and vol.shape == S.SHAPE
    (_, _, k1), (mask, mkw, k2) = S.phantom_mask()
    assert (k1, k2) == ("image", "labels") and mask.max() == 1
    np.testing.assert_allclose(mkw["metadata"]["nifti"]["affine"], kw["metadata"]["nifti"]["affine"])


def test_2d_nifti_round_trip(make_napari_viewer, tmp_path):
    affine = np.diag([0.5, -0.25, 2.0, 1.0])
    affine[:3, 3] = [3.0, 4.0, -5.0]
    data = np.random.default_rng(1).random((9, 7, 1)).astype(np.float32)
    src = _save(tmp_path / "slice.nii.gz", data, affine)
    viewer = make_napari_viewer()
    [layer] = viewer.open(src, plugin="napari-esegeta")
    assert layer.data.shape == (9, 7)
    np.testing.assert_allclose(layer_world_of_voxel(layer, (2, 3)), affine[:2, :2] @ [2, 3] + affine[:2, 3])
    written = viewer.layers.save(str(tmp_path / "slice_out.nii.gz"), selected=False, plugin="napari-esegeta")
    out = nib.load(written[0])
    np.testing.assert_allclose(out.affine, affine)
    np.testing.assert_array_equal(np.asarray(out.dataobj).reshape(9, 7), data[..., 0])
