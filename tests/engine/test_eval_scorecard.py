"""The trust scorecard per map: in the manifest, the CLI summary; built from the metrics a run made."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from esegeta_engine.config import parse_config
from esegeta_engine.evaluation.trust import SCORECARD, scorecard
from esegeta_engine.pipeline import run

from test_regions import Blur, phantom


def test_scorecard_statuses_follow_the_numbers():
    card = scorecard({"axiom_status": "ok", "completeness_error": 0.01, "road_morf": 0.2, "road_lerf": 0.9,
                      "roc_auc": 0.4, "stability_spearman": 0.8, "stability_source": "members"},
                     [{"passes": False, "mean_similarity": 0.93, "null": 0.2, "margin": 0.7, "mode": "cascading"}])
    assert [card[k]["status"] for k in SCORECARD] == ["checked", "failed", "checked", "failed", "checked"]
    assert np.isclose(card["faithfulness"]["value"], 0.7)
    assert "null 0.2" in card["randomisation"]["what"]
    assert card["line"].startswith("axiom ok 0.01 · randomisation FAILED 0.93")
    empty = scorecard({})
    assert all(empty[k]["status"] == "not checked" for k in SCORECARD)


@pytest.mark.parametrize("dims", [2, 3])
def test_a_run_writes_the_scorecard_the_spread_map_and_structure_scores(tmp_path, dims, capsys):
    import torch

    from esegeta_engine.cli_commands import _print_summary

    img, gt, masks = phantom(dims)
    affine = np.diag([0.8, 0.9, 1.5, 1.0])
    nib.save(nib.Nifti1Image(img, affine), tmp_path / "vol.nii.gz")
    nib.save(nib.Nifti1Image(gt.astype(np.uint8), affine), tmp_path / "gt.nii.gz")
    torch.jit.script(Blur(dims).eval()).save(str(tmp_path / "net.pt"))
    res = run(parse_config({
        "model": {"path": "net.pt"}, "volumes": ["vol.nii.gz"], "preprocess": {"spatial_dims": dims},
        "target": {"kind": "outcome", "ground_truth": "gt.nii.gz", "outcome": "tp"},
        "methods": [{"name": "input_x_gradient"}],
        "evaluation": {"road": {"percentages": [0.3, 0.6]}, "region_perturbation": {"region": 2, "steps": 3},
                       "stability": {"samples": 3}, "energy_pointing": {}}}, base=tmp_path))
    (rec,) = res.records
    trust = rec["trust"]
    assert set(SCORECARD) <= set(trust)
    assert trust["faithfulness"]["status"] in ("checked", "failed")
    assert trust["localisation"]["status"] in ("checked", "failed")
    assert trust["stability"]["status"] in ("checked", "failed") and trust["randomisation"]["status"] == "not checked"
    assert trust["axiom"]["status"] == "not checked"  # input x gradient promises no axiom
    spread = nib.load(str(res.out_dir / rec["stability_map"]))
    assert np.allclose(spread.affine, affine) and spread.shape == img.shape
    assert [s["component"] for s in rec["structures"]] == [1, 2]  # the found and the missed structure
    assert rec["metrics"]["road_evaluations"] == 2 and "region_aopc" in rec["metrics"]
    # the plan's estimate of the scores' cost equals what they made: ROAD 2, region 1, stability 3 x 1
    assert rec["metric_evaluations"] == rec["expected_metric_evaluations"] == 2 + 1 + 3
    manifest = json.loads((res.out_dir / "manifest.json").read_text())
    assert manifest["results"][0]["trust"]["line"] == trust["line"]
    _print_summary(res)
    assert trust["line"] in capsys.readouterr().out
    from esegeta_engine.evaluation.report import build_report_from_run

    page = build_report_from_run(res.out_dir).read_text()
    assert "Trust scorecard" in page and rec["stability_map"] in page
