"""A run's inputs: a mask's errors are the mask's, never the model's channels (``inputs.load_inputs``)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from torch import nn

from esegeta_engine.config import parse_config
from esegeta_engine.errors import VolumeError, VolumeShapeError
from esegeta_engine.inputs import load_inputs
from esegeta_engine.models.sources import LoadedModel


def _files(tmp_path, mask_shape):
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((8, 7, 6), dtype=np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image((rng.random(mask_shape) > 0.5).astype(np.uint8), np.eye(4)), tmp_path / "m.nii.gz")


@pytest.mark.parametrize("kind", ["roi", "outcome"])
def test_a_4d_mask_names_the_mask_file_and_not_the_channels(tmp_path, kind) -> None:
    _files(tmp_path, (8, 7, 6, 2))
    key = "roi_mask" if kind == "roi" else "ground_truth"
    cfg = parse_config({"model": {"path": "net.pt"}, "volumes": ["v.nii.gz"], "methods": [{"name": "saliency"}],
                        "target": {"kind": kind, key: "m.nii.gz", "classes": [1]}}, base=tmp_path)
    with pytest.raises(VolumeError) as exc:
        load_inputs(cfg)
    assert not isinstance(exc.value, VolumeShapeError)  # a mask is not a model input
    # how the run reports it through a deployed pipeline (pipeline.py: loaded.volume_error)
    source = LoadedModel(module=nn.Identity(), source="nnunet", input_note="dataset.json lists 1 input channel(s)")
    said = source.volume_error(exc.value)
    text = f"{said.problem}; {said.fix}"
    assert "m.nii.gz" in said.problem and "(8, 7, 6, 2)" in said.problem
    assert "channel(s)" not in text and "in_channels" not in text and "spatial_dims" not in text
    assert "3D image on the volume's grid" in said.fix


def test_a_missing_mask_is_named_as_the_mask(tmp_path) -> None:
    _files(tmp_path, (8, 7, 6))
    cfg = parse_config({"model": {"path": "net.pt"}, "volumes": ["v.nii.gz"], "methods": [{"name": "saliency"}],
                        "target": {"kind": "roi", "roi_mask": "gone.nii.gz"}}, base=tmp_path)
    with pytest.raises(VolumeError, match=r"^ROI mask: .*gone\.nii\.gz.* does not exist"):
        load_inputs(cfg)


def test_the_volume_itself_still_gets_the_channel_note(tmp_path) -> None:
    _files(tmp_path, (8, 7, 6))
    nib.save(nib.Nifti1Image(np.zeros((8, 7, 6, 2), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    cfg = parse_config({"model": {"path": "net.pt"}, "volumes": ["v.nii.gz"], "methods": [{"name": "saliency"}],
                        "target": {"kind": "roi", "roi_mask": "m.nii.gz"}}, base=tmp_path)
    with pytest.raises(VolumeShapeError) as exc:
        load_inputs(cfg)
    said = LoadedModel(module=nn.Identity(), source="nnunet", input_note="dataset.json lists 1 input channel(s)"
                       ).volume_error(exc.value)
    assert "v.nii.gz" in said.problem and "dataset.json lists 1 input channel(s)" in said.problem


def test_a_4d_roi_mask_through_an_nnunet_folder_on_the_command_line(nnunet_folder, tmp_path, capsys) -> None:
    pytest.importorskip("nnunetv2")
    import nnunet_setup as S

    from esegeta_engine.cli import main

    img, lab = S.scan((16, 12, 8), (1.0, 1.0, 2.0), seed=7)
    nib.save(img, tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([lab.get_fdata()] * 2, -1).astype(np.uint8), img.affine),
             tmp_path / "roi.nii.gz")
    assert main(["explain", "--nnunet", str(nnunet_folder), "--folds", "0", "--volume", str(tmp_path / "scan.nii.gz"),
                 "--target", "roi", "--roi-mask", str(tmp_path / "roi.nii.gz"), "--classes", "1",
                 "--method", "saliency", "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "ROI mask roi.nii.gz has shape (16, 12, 8, 2)" in err
    assert "dataset.json" not in err and "channels)" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_2d_image_for_a_3d_model_is_not_a_channel_problem(tmp_path) -> None:
    from esegeta_engine.io import load_volume

    nib.save(nib.Nifti1Image(np.ones((12, 10), np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    with pytest.raises(VolumeShapeError) as exc:
        load_volume(tmp_path / "slice.nii.gz", spatial_dims=3)
    assert "preprocess.spatial_dims: 2" in exc.value.fix and "4D" not in exc.value.fix  # a plain model: a 2D one?
    for source in (LoadedModel(module=nn.Identity(), source="nnunet", preprocess={"spatial_dims": 3},
                               input_note="dataset.json lists 1 input channel(s)"),
                   LoadedModel(module=nn.Identity(), source="bundle", preprocess={"spatial_dims": 3},
                               input_note="the bundle's network takes 1 input channel(s)")):
        said = source.volume_error(exc.value)
        assert "slice.nii.gz has shape (12, 10)" in said.problem
        assert "channel" not in f"{said.problem} {said.fix}" and "give a 3D scan" in said.fix
        assert "spatial_dims" not in said.fix  # the pipeline's dimension is not the user's setting
