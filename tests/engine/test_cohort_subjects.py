"""Per-subject folders with one file name work as a cohort: ids from the shortest telling path suffix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from cohort_helpers import cohort_data, write_phantoms

from esegeta_engine.cli import main
from esegeta_engine.cohort.config import parse_cohort_config
from esegeta_engine.cohort.plan import plan_cohort, resolve_volumes
from esegeta_engine.cohort.run import _manifest
from esegeta_engine.cohort.subjects import derive_subject_ids
from esegeta_engine.errors import ConfigError


def test_unique_file_names_stay_the_ids():
    ids, rule = derive_subject_ids([Path("/d/sub00.nii.gz"), Path("/e/sub01.nii")])
    assert ids == ["sub00", "sub01"] and rule == "from the file names"


def test_one_file_name_per_subject_folder_gives_the_folder_names():
    ids, rule = derive_subject_ids([Path(f"/data/sub-0{i}/image.nii.gz") for i in (1, 2, 3)])
    assert ids == ["sub-01", "sub-02", "sub-03"]
    assert rule == "from the folder names (file names repeat: image)"


def test_sessions_and_shared_folders_are_handled():
    paths = [Path(f"/bids/sub-0{s}/ses-{t}/anat/T1w.nii.gz") for s in (1, 2) for t in (1, 2)]
    ids, rule = derive_subject_ids(paths)
    assert ids == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_ses-1", "sub-02_ses-2"]
    assert "last 4 parts" in rule


def test_partly_repeated_names_keep_what_tells_them_apart():
    ids, _ = derive_subject_ids([Path("/d/a/x.nii.gz"), Path("/d/b/x.nii.gz"), Path("/d/c/y.nii.gz")])
    assert ids == ["a_x", "b_x", "c_y"]


def test_a_file_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="more than once"):
        derive_subject_ids([Path("/d/a/x.nii.gz"), Path("/d/a/x.nii.gz")])


def _subject_folders(tmp_path, n=3):
    flat = write_phantoms(tmp_path / "flat", n=n)
    for i, p in enumerate(flat, start=1):
        (tmp_path / "data" / f"sub-{i:02d}").mkdir(parents=True)
        shutil.copy(p, tmp_path / "data" / f"sub-{i:02d}" / "image.nii.gz")
    return [tmp_path / "data" / f"sub-{i:02d}" / "image.nii.gz" for i in range(1, n + 1)]


def test_glob_of_subject_folders_plans_with_folder_ids_recorded_in_the_manifest(tmp_path):
    _subject_folders(tmp_path)
    data = cohort_data(tmp_path)
    data["cohort"] = {"glob": str(tmp_path / "data" / "*" / "image.nii.gz")}
    cfg = parse_cohort_config(data)
    plan = plan_cohort(cfg)
    assert [v.subject for v in plan.volumes] == ["sub-01", "sub-02", "sub-03"]
    assert {j.file.split("/")[-1].split("__")[0] for j in plan.jobs} == {"sub-01", "sub-02", "sub-03"}
    manifest = _manifest(cfg, plan, "inline")
    assert [v["subject"] for v in manifest["volumes"]] == ["sub-01", "sub-02", "sub-03"]
    assert {v["subject_from"] for v in manifest["volumes"]} == {"from the folder names (file names repeat: image)"}


def test_csv_of_subject_folders_uses_given_subjects_first(tmp_path):
    _subject_folders(tmp_path)
    (tmp_path / "c.csv").write_text("volume,subject\ndata/sub-01/image.nii.gz,patient-A\n"
                                    "data/sub-02/image.nii.gz,\ndata/sub-03/image.nii.gz,\n")
    cfg = parse_cohort_config({**cohort_data(tmp_path), "cohort": {"csv": "c.csv"}}, base=tmp_path)
    vols = resolve_volumes(cfg)
    assert [v.subject for v in vols] == ["patient-A", "sub-02", "sub-03"]
    assert vols[0].subject_from == "from the CSV's subject column" and "folder names" in vols[1].subject_from


def test_dry_run_shows_the_derived_ids_and_writes_nothing(tmp_path, capsys):
    _subject_folders(tmp_path)
    data = cohort_data(tmp_path)
    data["cohort"] = {"glob": "data/*/image.nii.gz"}
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "cohort.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "subjects (from the folder names (file names repeat: image)): sub-01, sub-02, sub-03" in out
    assert "dry run" in out and not (tmp_path / "out").exists()
