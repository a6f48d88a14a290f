"""End to end on the bundled sample: the README's demo command, and the 2D classification path."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from esegeta_engine.cli import main


DEMO_E2E_METHODS = "saliency+layer_gradcam:layers=ups.0.block"
"""The README's demo command end to end (prediction, maps, localisation, report, log) with a gradient
and a layer method; every other default demo method is run on the same sample by the next test."""


def test_demo_command_on_the_sample(tmp_path, capfd):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--methods", DEMO_E2E_METHODS])
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr[-3000:]
    assert "2 of 2 maps written" in stdout and "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    src = nib.load(out / "input" / "phantom_volume.nii.gz")
    gt = np.asarray(nib.load(out / "input" / "phantom_mask.nii.gz").dataobj) > 0
    assert not np.allclose(src.affine, np.eye(4))
    pred = np.asarray(nib.load(out / manifest["volumes"][0]["prediction"]).dataobj) > 0
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    assert dice >= 0.8, dice  # the bundled model really segments
    _check_maps(out, manifest, src)
    assert (out / "report.html").is_file() and (out / "report.pdf").is_file() and (out / "esegeta.log").is_file()


def _check_maps(out, manifest, src):
    for rec in manifest["results"]:
        img = nib.load(out / rec["file"])
        data = np.asarray(img.dataobj)
        assert img.shape == src.shape and np.allclose(img.affine, src.affine)
        assert np.isfinite(data).all() and np.abs(data).max() > 0
        # gradient maps of the vessel class concentrate on vessels far above chance
        assert rec["metrics"]["roc_auc"] > 0.6, rec["method"]


def test_every_default_demo_method_localises_the_vessels(tmp_path):
    """The demo's other default methods (parameters as the demo runs them) on the demo's sample at 48³
    (the demo's run minus its report and the two methods above): finite maps on the source grid,
    concentrated on the vessels (ROC AUC > 0.6 against the phantom's ground truth)."""
    import torch

    from esegeta_engine.cli_commands import DEMO_METHODS
    from esegeta_engine.config import parse_config
    from esegeta_engine.pipeline import run
    from esegeta_engine.sample import sample_info, save_phantom_nifti, unet_paths

    first = {m.split(":")[0] for m in DEMO_E2E_METHODS.split("+")}
    rest = [m for m in DEMO_METHODS if m["name"] not in first]
    assert len(rest) == len(DEMO_METHODS) - 2  # every default method runs in one of the two tests
    vol, mask = save_phantom_nifti(tmp_path / "input", seed=0, shape=(48, 48, 48))
    info = sample_info()["models"]["unet3d_vessels"]
    cfg = parse_config({"model": {"path": str(unet_paths()["state"]), "class_path": info["class_path"],
                                  "kwargs": info["kwargs"]},
                        "volumes": [str(vol)], "preprocess": {"normalisation": "minmax"},
                        "target": {"kind": "argmax", "classes": [1]}, "methods": rest,
                        "output": {"dir": str(tmp_path / "out"), "save_prediction": False}, "run": {"seed": 0},
                        "evaluation": {"localisation": {"mask": str(mask)}, "report": False}}, source="demo")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(cfg)
    finally:
        torch.set_num_threads(threads)
    assert result.status == "completed" and [r["status"] for r in result.records] == ["ok"] * len(rest)
    manifest = json.loads(result.manifest_path.read_text())
    _check_maps(tmp_path / "out", manifest, nib.load(vol))


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
