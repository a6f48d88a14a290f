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


def test_with_every_check_on_each_row_has_a_status_and_a_number_in_record_cli_and_report(tmp_path, capsys):
    import torch

    from esegeta_engine.cli_commands import _print_summary
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    net = TinySegNet(3)
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.0, 0.05]))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4)),
             tmp_path / "vol.nii.gz")
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:6, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(gt, np.eye(4)), tmp_path / "gt.nii.gz")
    res = run(parse_config({
        "model": {"path": "model.pt", "class_path": "tiny_models:TinySegNet", "kwargs": {"dims": 3}},
        "volumes": ["vol.nii.gz"], "target": {"classes": [1]},
        "methods": [{"name": "integrated_gradients", "params": {"n_steps": 8}}], "output": {"dir": "out"},
        "evaluation": {"localisation": {"mask": "gt.nii.gz"}, "randomisation": {"max_stages": 2},
                       "road": {"percentages": [0.3, 0.6]}, "stability": {"samples": 3}, "report": True}},
        base=tmp_path))
    (rec,) = res.records
    trust = rec["trust"]
    for name in SCORECARD:  # all five checked (passed or failed), each with its number
        assert trust[name]["status"] in ("checked", "failed"), (name, trust[name])
        assert np.isfinite(trust[name]["value"]), name
    assert np.isfinite(trust["randomisation"]["null"])  # the verdict with its null
    assert "ROAD" in trust["faithfulness"]["what"] and "ground truth" in trust["localisation"]["what"]
    assert f"(null {trust['randomisation']['null']:.3g})" in trust["line"]
    _print_summary(res)
    assert trust["line"] in capsys.readouterr().out
    page = (res.out_dir / "report.html").read_text()
    table = page[page.index("<h2>Trust scorecard</h2>"):]
    table = table[:table.index("</table>")]
    for name in SCORECARD:
        e = trust[name]
        assert f">{e['status']} {e['value']:.3g}" in table, name


def test_a_check_that_could_not_run_says_why():
    card = scorecard({"stability_error": "MethodError: stability over folds: the model has 1 fold member(s)",
                      "road_error": "time limit reached"})
    assert card["stability"]["status"] == card["faithfulness"]["status"] == "not checked"
    assert "the model has 1 fold member" in card["stability"]["note"]
    assert card["faithfulness"]["note"] == "the check could not run: time limit reached"
