"""NIfTI reading checks, writing with the source geometry, atomic writes, preprocessing."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.errors import VolumeError
from esegeta_engine.io import load_volume, save_map, write_json
from esegeta_engine.preprocess import AxisOrder, normalise, to_model_input

AFFINE = np.array([[-0.4, 0.0, 0.0, 90.0],
                   [0.0, 0.45, 0.05, -120.0],
                   [0.0, -0.02, 0.6, -40.0],
                   [0.0, 0.0, 0.0, 1.0]])


def write(path, data, affine=AFFINE):
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def test_affine_round_trip(tmp_path):
    data = np.random.rand(5, 6, 7).astype(np.float32)
    vol = load_volume(write(tmp_path / "v.nii.gz", data))
    assert np.allclose(vol.affine, AFFINE)
    out = save_map(data * 2, vol, tmp_path / "out" / "map.nii.gz")
    img = nib.load(out)
    assert np.allclose(img.affine, AFFINE) and not np.allclose(img.affine, np.eye(4))
    assert np.allclose(img.get_sform(), AFFINE)  # exact, shear included (qform cannot hold shear)
    assert img.get_data_dtype() == np.float32
    assert np.allclose(np.asarray(img.dataobj), data * 2)
    assert [p.name for p in out.parent.iterdir()] == ["map.nii.gz"]  # no temp files left


def test_orthogonal_affine_keeps_qform(tmp_path):
    affine = np.diag([-0.5, 0.5, 0.8, 1.0])
    affine[:3, 3] = [10, -20, 30]
    vol = load_volume(write(tmp_path / "v.nii.gz", np.zeros((4, 4, 4)), affine))
    img = nib.load(save_map(np.ones((4, 4, 4)), vol, tmp_path / "m.nii.gz"))
    assert np.allclose(img.header.get_qform(), affine, atol=1e-5)
    assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0


def test_failed_write_leaves_no_file(tmp_path):
    vol = load_volume(write(tmp_path / "v.nii", np.zeros((4, 4, 4))))
    with pytest.raises(ValueError):
        save_map(np.zeros((3, 3, 3)), vol, tmp_path / "o" / "bad.nii.gz")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_missing_corrupt_and_non_nifti(tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        load_volume(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(b"garbage" * 100))
    with pytest.raises(VolumeError, match="cannot be read"):
        load_volume(bad)
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    with pytest.raises(VolumeError, match="not a NIfTI"):
        load_volume(txt)


def test_4d_rejected_and_trailing_singletons_dropped(tmp_path):
    with pytest.raises(VolumeError, match=r"shape \(4, 4, 4, 3\)"):
        load_volume(write(tmp_path / "t.nii.gz", np.zeros((4, 4, 4, 3))))
    assert load_volume(write(tmp_path / "s.nii.gz", np.zeros((4, 4, 4, 1)))).data.shape == (4, 4, 4)
    assert load_volume(write(tmp_path / "m.nii.gz", np.zeros((4, 4, 4, 3))), channels=3).data.shape == (4, 4, 4, 3)
    img2d = load_volume(write(tmp_path / "i.nii.gz", np.zeros((6, 5, 1))), spatial_dims=2)
    assert img2d.data.shape == (6, 5)
    with pytest.raises(VolumeError, match="2D image"):
        load_volume(write(tmp_path / "v3.nii.gz", np.zeros((6, 5, 4))), spatial_dims=2)


def test_nan_and_inf_rejected(tmp_path):
    data = np.zeros((4, 4, 4), dtype=np.float32)
    data[1, 1, 1] = np.nan
    data[2, 2, 2] = np.inf
    with pytest.raises(VolumeError, match="2 NaN or Inf"):
        load_volume(write(tmp_path / "n.nii.gz", data))


def test_json_is_atomic(tmp_path):
    p = write_json({"a": np.float32(1.5), "b": np.arange(2)}, tmp_path / "m.json")
    assert p.read_text().strip().startswith("{") and '"a": 1.5' in p.read_text()


def test_axis_order_is_reversible():
    a = np.random.rand(3, 4, 5)
    for order in ("xyz", "zyx", "yzx", "xzy"):
        o = AxisOrder(order)
        assert np.array_equal(o.to_nifti(o.to_model(a)), a)
    assert AxisOrder("zyx").to_model(a).shape == (5, 4, 3)
    assert AxisOrder("yx").to_model(np.zeros((3, 4))).shape == (4, 3)


def test_normalisations():
    rng = np.random.default_rng(0)
    a = rng.normal(5, 3, size=(10, 10, 10)).astype(np.float32)
    assert abs(normalise(a, "zscore").mean()) < 1e-4 and abs(normalise(a, "zscore").std() - 1) < 1e-3
    mm = normalise(a, "minmax")
    assert mm.min() == 0 and mm.max() == 1
    a[0, 0, 0] = 1e6  # an outlier
    pc = normalise(a, "percentile", (1, 99))
    assert pc.max() == 1 and np.median(pc) > 0.3


@pytest.mark.parametrize("mode", ["none", "zscore", "minmax", "percentile"])
def test_every_normalisation_gives_float32_model_input(mode):
    # NumPy 2 promotes float32 with numpy float64 scalars (np.percentile's) to float64: a float64 input
    # then fails in the network's float32 convolutions ("expected scalar type Double but found Float")
    a = np.random.default_rng(0).normal(5, 3, size=(6, 7, 8)).astype(np.float32)
    assert normalise(a, mode).dtype == np.float32
    assert to_model_input(a, spatial_dims=3, normalisation=mode).dtype == torch.float32


def test_model_input_shape_and_channel_errors():
    x = to_model_input(np.zeros((4, 5, 6)), spatial_dims=3, axis_order="zyx")
    assert tuple(x.shape) == (1, 1, 6, 5, 4)
    with pytest.raises(VolumeError, match="expects 2"):
        to_model_input(np.zeros((4, 5, 6)), spatial_dims=3, in_channels=2)
    assert tuple(to_model_input(np.zeros((4, 5, 6, 2)), spatial_dims=3, in_channels=2).shape) == (1, 2, 4, 5, 6)
