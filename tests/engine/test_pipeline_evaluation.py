"""A run with every evaluation on: metrics in the manifest, curves, randomisation, report."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.config import parse_config
from esegeta_engine.pipeline import run

AFFINE = np.diag([0.5, 0.5, 0.8, 1.0])


@pytest.fixture
def case(tmp_path):
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    model = TinySegNet(3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.05]))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    vol = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "vol.nii.gz")
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), tmp_path / "gt.nii.gz")
    return tmp_path


def config(tmp_path, **evaluation):
    return parse_config({
        "model": {"path": "model.pt", "class_path": "tiny_models:TinySegNet", "kwargs": {"dims": 3}},
        "volumes": ["vol.nii.gz"], "target": {"classes": [1]},
        "methods": [{"name": "saliency"}, {"name": "layer_gradcam", "layers": ["conv2"]}],
        "output": {"dir": "out"}, "evaluation": evaluation,
    }, base=tmp_path)


def test_all_evaluations(case):
    cfg = config(case, infidelity={"n_perturb_samples": 4}, sensitivity={"n_perturb_samples": 2},
                 faithfulness={"steps": 4}, localisation={"mask": "gt.nii.gz"},
                 randomisation={"max_stages": 2}, report=True)
    result = run(cfg)
    assert result.status == "completed"
    manifest = json.loads(result.manifest_path.read_text())
    for rec in manifest["results"]:
        m = rec["metrics"]
        for key in ("infidelity", "sensitivity", "auc_deletion", "auc_insertion", "aopc_deletion",
                    "mass_inside", "rank_accuracy", "pointing_game", "roc_auc"):
            assert key in m, (rec["method"], key)
        assert m["infidelity"] is None or np.isfinite(m["infidelity"])
    assert "sensitivity_note" in next(r for r in manifest["results"] if r["method"] == "layer_gradcam")["metrics"]
    curves = json.loads((case / "out" / "curves.json").read_text())
    assert set(curves) == {r["file"] for r in manifest["results"]}
    rnd = manifest["randomisation"][0]
    assert rnd["mode"] == "cascading" and len(rnd["stages"]) == 2 and rnd["stages"][0] == "head"
    for method, files in rnd["files"].items():
        for name in files.values():
            img = nib.load(case / "out" / "randomisation" / name)
            assert np.allclose(img.affine, AFFINE)
    assert (case / "out" / rnd["figure"]).is_file()
    html = (case / "out" / manifest["report"]).read_text()
    HTMLParser().feed(html)
    for name in ("saliency", "layer_gradcam", "roc_auc", "infidelity", "Slice montages",
                 "Faithfulness curves", "Randomisation sanity check", rnd["figure"]):
        assert name in html, name
    assert len(list((case / "out" / "figures").glob("*__montage.png"))) == 2
    assert len(list((case / "out" / "figures").glob("*__curves.png"))) == 1
    assert (case / "out" / "metrics.csv").is_file()


def test_ground_truth_on_another_grid_is_undefined_and_the_rest_is_kept(case):
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), AFFINE), case / "small.nii.gz")
    result = run(config(case, localisation={"mask": "small.nii.gz"}, faithfulness={"steps": 4}))
    assert result.status == "completed" and len(result.records) == 2
    for rec in result.records:
        m = rec["metrics"]
        assert rec["status"] == "ok" and m["roc_auc"] is None and m["iou_otsu"] is None
        assert m["note"].startswith("undefined:") and "shape" in m["note"]
        assert m["auc_deletion"] is not None


def test_empty_ground_truth_gives_undefined_scores_not_a_crash(case):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), AFFINE), case / "empty.nii.gz")
    result = run(config(case, localisation={"mask": "empty.nii.gz"}))
    assert result.status == "completed"
    assert all(r["metrics"]["roc_auc"] is None for r in result.records)
