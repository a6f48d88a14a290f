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
