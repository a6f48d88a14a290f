"""End to end on the bundled sample: the README's demo command, and the 2D classification path."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np

from esegeta_engine.cli import main


def test_demo_command_on_the_sample(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "esegeta_engine.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 of 8 maps written" in proc.stdout and "Traceback" not in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    src = nib.load(out / "input" / "phantom_volume.nii.gz")
    gt = np.asarray(nib.load(out / "input" / "phantom_mask.nii.gz").dataobj) > 0
    assert not np.allclose(src.affine, np.eye(4))
    pred = np.asarray(nib.load(out / manifest["volumes"][0]["prediction"]).dataobj) > 0
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    assert dice >= 0.8, dice  # the bundled model really segments
    for rec in manifest["results"]:
        img = nib.load(out / rec["file"])
        data = np.asarray(img.dataobj)
        assert img.shape == src.shape and np.allclose(img.affine, src.affine)
        assert np.isfinite(data).all() and np.abs(data).max() > 0
        # gradient maps of the vessel class concentrate on vessels far above chance
        assert rec["metrics"]["roc_auc"] > 0.6, rec["method"]
    assert (out / "report.html").is_file() and (out / "esegeta.log").is_file()


def test_classification_path_with_the_2d_sample(tmp_path, capsys):
    from esegeta_engine.sample import classifier_paths, make_phantom_2d, sample_info

    ph = make_phantom_2d(seed=424242, has_vessel=True)
    affine = ph.affine
    nib.save(nib.Nifti1Image(ph.image[..., None], affine), tmp_path / "slice.nii.gz")
    info = sample_info()["models"]["classifier2d"]
    code = main(["explain", "--model", str(classifier_paths()["state"]), "--class-path", info["class_path"],
                 "--kwargs", json.dumps(info["kwargs"]), "--volume", str(tmp_path / "slice.nii.gz"),
                 "--spatial-dims", "2", "--normalisation", "minmax", "--target", "classification",
                 "--method", "saliency", "--method", "occlusion:window=8",
                 "--method", "layer_gradcam:layers=conv2", "--out", str(tmp_path / "out"), "-q"])
    assert code == 0, capsys.readouterr()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {r["target"] for r in manifest["results"]} == {"classification-class1"}  # predicted: vessel
    for rec in manifest["results"]:
        img = nib.load(tmp_path / "out" / rec["file"])
        assert img.shape[:2] == ph.image.shape and np.allclose(img.affine, affine)
