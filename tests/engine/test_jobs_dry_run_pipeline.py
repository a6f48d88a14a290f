"""`esegeta run --dry-run` through a deployed pipeline: what the pipeline refuses is listed as refused.

Found trying the product as a new user: DeepLIFT through nnU-Net's pipeline is refused by the run before any
evaluation (``methods.run``: the pipeline's ``method_refusal``), but the dry run plans it as 2 model evaluations
and does not list it under "refused before any work" (``jobs/dry_run.py`` asks only ``jobs.refusal.refusals``).
"""

from __future__ import annotations

import pytest
import yaml

import nnunet_setup as S
from esegeta_engine.cli import main

pytest.importorskip("nnunetv2")


def test_dry_run_lists_deeplift_through_nnunet_as_refused(nnunet_folder, tmp_path, capsys):
    import nibabel as nib

    img, _ = S.scan((16, 12, 8), (1.0, 1.0, 2.0), seed=7)
    nib.save(img, tmp_path / "scan.nii.gz")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": {"nnunet": str(nnunet_folder), "folds": [0]}, "volumes": ["scan.nii.gz"],
        "target": {"classes": [1]}, "methods": [{"name": "saliency"}, {"name": "deeplift"}],
        "output": {"dir": "out"}}))
    assert main(["run", str(tmp_path / "run.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan: 1 job(s)" in out  # saliency only
    refused = [line for line in out.splitlines() if " · deeplift" in line]
    assert len(refused) == 1 and "cannot run through nnU-Net's pipeline" in refused[0]


def test_dry_run_refuses_a_layer_method_per_layer_like_the_run(nnunet_folder, tmp_path, capsys):
    """A layer method on two layers, one inside nnU-Net's fold networks where it is not built: the run refuses
    that layer's job only (``methods.run.check_applicable``); the dry run refused the whole method."""
    import json

    import nibabel as nib

    inside = "folds.0.encoder.stages.1"
    img, _ = S.scan((16, 12, 8), (1.0, 1.0, 2.0), seed=7)
    nib.save(img, tmp_path / "scan.nii.gz")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": {"nnunet": str(nnunet_folder), "folds": [0], "mirroring": False}, "volumes": ["scan.nii.gz"],
        "target": {"classes": [1]},
        "methods": [{"name": "layer_conductance", "params": {"n_steps": 2, "internal_batch_size": 2},
                     "layers": ["network_input", inside]}],
        "output": {"dir": "out"}}))
    assert main(["run", str(tmp_path / "run.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    planned = [line for line in out.splitlines() if line.startswith("  scan · layer_conductance")
               and line.endswith(("model evaluation", "model evaluations"))]
    assert "plan: 1 job(s)" in out and len(planned) == 1 and "layer_conductance@network_input" in planned[0]
    assert "1 model evaluations" not in out  # one is singular
    refused = [line for line in out.splitlines() if f"layer_conductance@{inside}:" in line]
    assert len(refused) == 1 and "inside nnU-Net's fold networks is not built" in refused[0]
    assert not (tmp_path / "out").exists()

    main(["run", str(tmp_path / "run.yaml"), "-q"])  # the run: the same split
    results = json.loads((tmp_path / "out" / "manifest.json").read_text())["results"]
    status = {r["layer"]: r["status"] for r in results}
    assert status["network_input"] == "ok" and status[inside] != "ok"
    expected = int(planned[0].rsplit(": ", 1)[1].split()[0])
    assert next(r for r in results if r["layer"] == "network_input")["expected_evaluations"] == expected


def test_the_runs_estimate_leaves_out_what_it_refuses(nnunet_folder, tmp_path):
    """The run said 'model evaluations: 10, estimated 12 before the run': DeepLIFT, refused through nnU-Net's
    pipeline before any evaluation, was still estimated at 2."""
    import json

    import nibabel as nib

    img, _ = S.scan((16, 12, 8), (1.0, 1.0, 2.0), seed=7)
    nib.save(img, tmp_path / "scan.nii.gz")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": {"nnunet": str(nnunet_folder), "folds": [0], "mirroring": False}, "volumes": ["scan.nii.gz"],
        "target": {"classes": [1]}, "methods": [{"name": "saliency"}, {"name": "deeplift"}],
        "output": {"dir": "out"}}))
    main(["run", str(tmp_path / "run.yaml"), "-q"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [r["status"] for r in manifest["results"]] == ["ok", "failed"]
    assert manifest["estimated_model_evaluations"] == manifest["model_evaluations"] == 1
