"""Stability over a real nnU-Net model's folds and mirrored copies, in a run (the models' ``members(kind)``)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nnunetv2")

import nnunet_setup as S  # noqa: E402

from esegeta_engine.config import parse_config  # noqa: E402
from esegeta_engine.pipeline import run  # noqa: E402


@pytest.mark.parametrize("over, folds, names", [
    ("folds", [0, 1], ["fold 0", "fold 1"]),
    ("auto", [0, 1], ["fold 0", "fold 1"]),  # several folds: auto takes them
    ("mirrors", [0], None),  # one fold: each of its mirrored copies alone
])
def test_a_run_explains_each_fold_or_mirror_alone(nnunet_folder, tmp_path, over, folds, names):
    img, _ = S.scan((14, 11, 6), (0.9, 1.1, 2.5), seed=5)
    nib.save(img, tmp_path / "scan.nii.gz")
    res = run(parse_config({
        "model": {"nnunet": str(nnunet_folder), "folds": folds}, "volumes": ["scan.nii.gz"],
        "target": {"classes": [1]}, "methods": [{"name": "saliency"}], "output": {"dir": "out"},
        "evaluation": {"axioms": None, "stability": {"over": over}}}, base=tmp_path))
    assert res.status == "completed" and not res.failed
    manifest = json.loads(res.manifest_path.read_text())
    (rec,) = manifest["results"]
    m = rec["metrics"]
    assert m["stability_over"] == ("folds" if over == "auto" else over)
    members = m["stability_members"].split("; ")
    if names is not None:
        assert members == names
    else:  # nnU-Net's 3D mirroring: 8 copies, the first unflipped
        assert len(members) == 8 and members[0] == "no mirroring"
    assert m["stability_n"] == len(members) and m["stability_std_mean"] > 0
    # one saliency per member, as the estimate counted (the pipeline's calls are counted per member)
    assert m["stability_evaluations"] == len(members) * rec["model_evaluations"]
    assert rec["metric_evaluations"] == rec["expected_metric_evaluations"]
    assert manifest["model_evaluations"] == manifest["estimated_model_evaluations"]
    spread = nib.load(str(res.out_dir / rec["stability_map"]))  # the spread on the scan's grid
    assert spread.shape == img.shape and np.allclose(spread.affine, img.affine)
    assert f"over {len(members)} {m['stability_over']}" in rec["trust"]["stability"]["what"]
