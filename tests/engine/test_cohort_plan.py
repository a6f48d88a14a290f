"""Cohort planning: stable job keys, the dry run, and bad input refused before any work starts."""

from __future__ import annotations

import socket
import time

import nibabel as nib
import numpy as np
import pytest
import yaml

from cohort_helpers import cohort_config, cohort_data, write_phantoms
from esegeta_engine.cli import main
from esegeta_engine.cohort import job_key, parse_cohort_config, plan_cohort, run_cohort
from esegeta_engine.jobs.executors import connect
from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import ConfigError, VolumeError


def test_job_key_covers_what_changes_the_numbers_and_nothing_else():
    t, p = TargetConfig(kind="argmax", classes=[1]), PreprocessConfig()
    base = job_key("m" * 64, "v" * 64, MethodConfig(name="integrated_gradients"), 1, t, p, 0)
    # an explicit default parameter and target.classes (the class is its own argument) change nothing
    explicit = MethodConfig(name="integrated_gradients", params={"n_steps": 32})
    from esegeta_engine.methods import get_method

    assert get_method("integrated_gradients").resolve_params({})["n_steps"] == 32
    assert job_key("m" * 64, "v" * 64, explicit, 1, TargetConfig(kind="argmax", classes=[0, 1]), p, 0) == base
    changed = [
        job_key("x" * 64, "v" * 64, MethodConfig(name="integrated_gradients"), 1, t, p, 0),
        job_key("m" * 64, "x" * 64, MethodConfig(name="integrated_gradients"), 1, t, p, 0),
        job_key("m" * 64, "v" * 64, MethodConfig(name="integrated_gradients", params={"n_steps": 8}), 1, t, p, 0),
        job_key("m" * 64, "v" * 64, MethodConfig(name="integrated_gradients"), 0, t, p, 0),
        job_key("m" * 64, "v" * 64, MethodConfig(name="integrated_gradients"), 1, t, p, 1),
        job_key("m" * 64, "v" * 64, MethodConfig(name="integrated_gradients"), 1,
                TargetConfig(kind="otsu", classes=[1]), p, 0),
        job_key("m" * 64, "v" * 64, MethodConfig(name="integrated_gradients"), 1, t,
                PreprocessConfig(normalisation="zscore"), 0),
        job_key("m" * 64, "v" * 64, MethodConfig(name="integrated_gradients", noise_tunnel={"samples": 2}),
                1, t, p, 0),
    ]
    assert len({base, *changed}) == len(changed) + 1 and all(len(k) == 64 for k in changed)


def test_plan_lists_every_job_once_and_dry_run_writes_nothing(tmp_path, capsys):
    write_phantoms(tmp_path / "data")
    cfg = cohort_config(tmp_path)
    plan = plan_cohort(cfg)
    assert len(plan.jobs) == 2 * 4 * 3 * 1 and len({j.key for j in plan.jobs}) == 24
    assert len({j.file for j in plan.jobs}) == 24 and plan.common_grid
    # the same inputs planned again give the same keys (hashes of files, not of paths or time)
    assert [j.key for j in plan_cohort(cohort_config(tmp_path)).jobs] == [j.key for j in plan.jobs]
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(cohort_data(tmp_path)))
    assert main(["run", str(tmp_path / "cohort.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "24 jobs" in out and "dry run" in out
    assert not (tmp_path / "out").exists()


def test_glob_matching_nothing_is_refused(tmp_path):
    write_phantoms(tmp_path / "data", n=1)
    cfg = parse_cohort_config({**cohort_data(tmp_path), "cohort": {"glob": str(tmp_path / "nope" / "*.nii.gz")}})
    with pytest.raises(ConfigError, match="matches no NIfTI file") as exc:
        plan_cohort(cfg)
    assert exc.value.fix


def test_csv_row_with_a_missing_file_names_the_line(tmp_path):
    write_phantoms(tmp_path / "data", n=2)
    (tmp_path / "c.csv").write_text("volume,ground_truth,subject,group\n"
                                    "data/sub00.nii.gz,data/sub00_gt.nii.gz,a,x\n"
                                    "data/sub01.nii.gz,data/missing_gt.nii.gz,b,y\n")
    cfg = parse_cohort_config({**cohort_data(tmp_path), "cohort": {"csv": "c.csv"}}, base=tmp_path)
    with pytest.raises(VolumeError, match=r"c.csv line 3: ground truth .*missing_gt.nii.gz.* does not exist"):
        run_cohort(cfg)
    assert not (tmp_path / "out").exists()


def _other_grid(tmp_path):
    write_phantoms(tmp_path / "data", n=2)
    img = nib.load(tmp_path / "data" / "sub01.nii.gz")
    aff = img.affine.copy()
    aff[0, 3] += 5.0  # same shape, shifted 5 mm: another space
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), tmp_path / "data" / "sub01.nii.gz")


def test_different_grids_asked_to_aggregate_are_refused_before_work(tmp_path):
    _other_grid(tmp_path)
    cfg = cohort_config(tmp_path, aggregate="require")
    with pytest.raises(VolumeError, match="different grids") as exc:
        run_cohort(cfg)
    assert "resample" in exc.value.fix and not (tmp_path / "out").exists()


def test_different_grids_by_default_give_per_volume_maps_only_said_clearly(tmp_path):
    _other_grid(tmp_path)
    data = cohort_data(tmp_path)
    data["models"], data["methods"] = data["models"][:1], data["methods"][:1]
    result = run_cohort(parse_cohort_config(data))
    import json

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert result.status == "completed" and len(result.records) == 2
    assert manifest["cohort"]["aggregates"] == [] and not manifest["cohort"]["common_grid"]
    assert "per-volume maps only" in manifest["cohort"]["grid_note"]
    assert "per-volume maps only" in (tmp_path / "out" / "esegeta.log").read_text()
    assert not (tmp_path / "out" / "aggregate").exists()


def test_two_models_with_one_name_are_refused(tmp_path):
    data = cohort_data(tmp_path)
    data["models"][1]["name"] = "base"
    with pytest.raises(ConfigError, match="two models are named 'base'"):
        parse_cohort_config(data)


def test_cohort_needs_explicit_classes_and_one_volume_source(tmp_path):
    data = cohort_data(tmp_path)
    with pytest.raises(ConfigError, match="target.classes"):
        parse_cohort_config({**data, "target": {"kind": "argmax"}})
    with pytest.raises(ConfigError, match="exactly one way"):
        parse_cohort_config({**data, "cohort": {**data["cohort"], "volumes": ["a.nii.gz"]}})


def test_scheduler_that_does_not_answer_fails_fast_with_a_fix(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="no Dask scheduler answered") as exc:
        connect(f"tcp://127.0.0.1:{port}", timeout_s=2.0)
    assert time.perf_counter() - start < 10 and "--executor local" in exc.value.fix


def test_local_workers_get_one_device_each_by_worker_name():
    from types import SimpleNamespace

    from esegeta_engine.jobs.executors import _worker_plugin
    from esegeta_engine.jobs.worker import worker_device

    plugin = _worker_plugin(["cuda:0", "cuda:1"], None)
    workers = [SimpleNamespace(name=i) for i in range(3)]
    for w in workers:
        plugin.setup(w)
    assert [w.esegeta_device for w in workers] == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_device("cpu") == "cpu"  # outside a Dask worker: the model's configured device


def test_cli_unanswering_scheduler_is_one_message_and_nothing_written(tmp_path, capsys):
    write_phantoms(tmp_path / "data", n=1)
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(cohort_data(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["run", str(tmp_path / "cohort.yaml"), "--executor", "dask", "--scheduler",
                 f"tcp://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and "error: no Dask scheduler answered" in err and "fix:" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_roi_target_needs_a_mask_for_every_subject_and_the_mask_is_in_the_key(tmp_path):
    write_phantoms(tmp_path / "data", n=2)
    (tmp_path / "c.csv").write_text("volume,roi\ndata/sub00.nii.gz,data/sub00_gt.nii.gz\ndata/sub01.nii.gz,\n")
    data = {**cohort_data(tmp_path), "cohort": {"csv": "c.csv"}, "target": {"kind": "roi", "classes": [0]}}
    with pytest.raises(ConfigError, match="subject sub01 has no ROI mask"):
        plan_cohort(parse_cohort_config(data, base=tmp_path))
    (tmp_path / "c.csv").write_text("volume,roi\ndata/sub00.nii.gz,data/sub00_gt.nii.gz\n"
                                    "data/sub01.nii.gz,data/sub01_gt.nii.gz\n")
    keys = [j.key for j in plan_cohort(parse_cohort_config(data, base=tmp_path)).jobs]
    (tmp_path / "c.csv").write_text("volume,roi\ndata/sub00.nii.gz,data/sub01_gt.nii.gz\n"
                                    "data/sub01.nii.gz,data/sub01_gt.nii.gz\n")
    changed = [j.key for j in plan_cohort(parse_cohort_config(data, base=tmp_path)).jobs]
    assert sum(a != b for a, b in zip(keys, changed)) == len(keys) // 2  # sub00's jobs only
