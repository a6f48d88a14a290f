"""A class an nnU-Net model does not have is refused from dataset.json before any work.

Found trying the product as a new user: ``esegeta explain --nnunet DIR --classes 5`` on a two-label model
gave a clear error, but only after the prediction pass, leaving the prediction, a failed manifest and a log
in the output folder.
"""

from __future__ import annotations

import nibabel as nib
import pytest

import nnunet_setup as S
from esegeta_engine.cli import main

pytest.importorskip("nnunetv2")


def test_a_class_the_model_lacks_is_refused_before_anything_is_written(nnunet_folder, tmp_path, capsys):
    img, _ = S.scan((16, 12, 8), (1.0, 1.0, 2.0), seed=3)
    nib.save(img, tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    rc = main(["explain", "--nnunet", str(nnunet_folder), "--folds", "0", "--volume", str(tmp_path / "scan.nii.gz"),
               "--method", "saliency", "--classes", "5", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "[5] do not exist" in err and "output channels" in err and "0..1" in err
    assert "Traceback" not in err
    assert not out.exists()  # no prediction, no manifest, no log


def test_the_classes_it_has_still_run(nnunet_folder, tmp_path):
    img, _ = S.scan((16, 12, 8), (1.0, 1.0, 2.0), seed=3)
    nib.save(img, tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    rc = main(["explain", "--nnunet", str(nnunet_folder), "--folds", "0", "--volume", str(tmp_path / "scan.nii.gz"),
               "--method", "saliency", "--classes", "1", "--out", str(out)])
    assert rc == 0
    assert any(p.name.endswith(".nii.gz") and "saliency" in p.name for p in out.iterdir())
