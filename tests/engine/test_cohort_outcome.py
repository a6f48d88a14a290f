"""A cohort explains each subject's errors against its own ground truth (outcome target, CSV column)."""

from __future__ import annotations

import pytest

from cohort_helpers import cohort_data, write_phantoms
from esegeta_engine.cohort import parse_cohort_config, run_cohort
from esegeta_engine.errors import ConfigError


def test_outcome_targets_read_each_subjects_ground_truth(tmp_path):
    write_phantoms(tmp_path / "data", n=2)
    rows = ["volume,ground_truth"] + [f"data/sub{i:02d}.nii.gz,data/sub{i:02d}_gt.nii.gz" for i in range(2)]
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    data = cohort_data(tmp_path)
    data["models"] = data["models"][:1]
    data["cohort"] = {"csv": str(tmp_path / "cohort.csv")}
    data["methods"] = [{"name": "saliency"}]
    data["target"] = {"kind": "outcome", "outcome": "tp", "classes": [1]}
    result = run_cohort(parse_cohort_config(data), executor="inline")
    assert result.status == "completed" and len(result.records) == 2 and not result.failed
    # a job whose target lacked its subject's ground truth would fail ("needs target.ground_truth")
    assert all(r["file"].endswith("__outcome-1.nii.gz") for r in result.records)
    data["target"] = {"kind": "argmax", "classes": [1], "components": True}
    with pytest.raises(ConfigError, match="components is not part of cohort runs"):
        parse_cohort_config(data)
