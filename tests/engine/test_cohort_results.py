"""Cohort results (inline executor): aggregates, comparisons, tables, the manifest, resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from cohort_helpers import cohort_data, write_phantoms
from esegeta_engine.cohort import parse_cohort_config, run_cohort
from esegeta_engine.jobs.worker import TRACE_ENV


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def _csv_cohort(tmp_path: Path) -> dict:
    write_phantoms(tmp_path / "data")
    rows = ["volume,ground_truth,subject,group"] + [
        f"data/sub{i:02d}.nii.gz,data/sub{i:02d}_gt.nii.gz,s{i},{'AB'[i % 2]}" for i in range(4)]
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    data = cohort_data(tmp_path)
    data["cohort"] = {"csv": str(tmp_path / "cohort.csv")}
    return data


def test_aggregates_comparisons_and_tables_match_the_written_maps(tmp_path):
    data = _csv_cohort(tmp_path)
    data["evaluation"] = {"report": True}
    result = run_cohort(parse_cohort_config(data))
    out = tmp_path / "out"
    assert result.status == "completed" and len(result.records) == 24 and not result.failed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "cohort" and manifest["status"] == "completed"
    ref = nib.load(tmp_path / "data" / "sub00.nii.gz")
    aggs = manifest["cohort"]["aggregates"]
    assert len(aggs) == 2 * 3  # model x method (one class)
    for agg in aggs:
        files = [out / r["file"] for r in manifest["results"]
                 if (r["model"], r["method"], r["class"]) == (agg["model"], agg["method"], agg["class"])]
        assert len(files) == 4 == agg["n"]
        stack = np.stack([m / np.abs(m).max() for m in map(_load, files)])
        assert np.allclose(_load(out / agg["mean"]), stack.mean(0), atol=1e-6)
        assert np.allclose(_load(out / agg["std"]), stack.std(0), atol=1e-6)
        assert np.allclose(nib.load(out / agg["mean"]).affine, ref.affine)
    by = {(a["model"], a["method"]): a for a in aggs}
    [cmp] = [c for c in manifest["cohort"]["comparisons"] if c["method"] == "saliency"]
    expected = _load(out / by[("base", "saliency")]["mean"]) - _load(out / by[("tuned", "saliency")]["mean"])
    assert np.allclose(_load(out / cmp["file"]), expected, atol=1e-6) and np.abs(expected).max() > 0
    # the cohort table joins every job's metrics (localisation vs each subject's own ground truth)
    rows = list(csv.DictReader((out / "cohort_metrics.csv").open()))
    assert len(rows) == 24 and {r["group"] for r in rows} == {"A", "B"}
    rec = next(r for r in manifest["results"] if r["subject"] == "s2" and r["model"] == "base"
               and r["method"] == "saliency")
    from esegeta_engine.evaluation.localisation import localisation_scores

    gt = _load(tmp_path / "data" / "sub02_gt.nii.gz") != 0
    assert np.isclose(rec["metrics"]["mass_inside"],
                      localisation_scores(_load(out / rec["file"]), gt)["mass_inside"])
    groups = list(csv.DictReader((out / "group_summary.csv").open()))
    g = next(r for r in groups if (r["group"], r["model"], r["method"]) == ("A", "base", "saliency"))
    vals = [r["metrics"]["mass_inside"] for r in manifest["results"]
            if r["group"] == "A" and r["model"] == "base" and r["method"] == "saliency"]
    assert int(g["n"]) == 2 and np.isclose(float(g["mass_inside_mean"]), np.mean(vals))
    paired = list(csv.DictReader((out / "paired_metrics.csv").open()))
    assert len(paired) == 4 * 3 and {(p["model_a"], p["model_b"]) for p in paired} == {("base", "tuned")}
    assert (out / "cohort_report.html").is_file() and "aggregate" in (out / "cohort_report.html").read_text()


def test_resume_keeps_valid_results_and_redoes_changed_ones(tmp_path):
    write_phantoms(tmp_path / "data", n=2)
    data = cohort_data(tmp_path)
    data["methods"] = data["methods"][:1]
    first = run_cohort(parse_cohort_config(data))
    assert len(first.records) == 4
    tampered = tmp_path / "out" / first.records[0]["file"]
    tampered.write_bytes(tampered.read_bytes()[:-10])  # a damaged map: its checksum no longer matches
    again = run_cohort(parse_cohort_config(data), resume=True)
    assert again.skipped == 3 and again.status == "completed" and len(again.records) == 4
    assert {r["key"] for r in again.records} == {r["key"] for r in first.records}
    assert np.allclose(_load(tampered), _load(tmp_path / "out" / first.records[0]["file"]))


def test_resume_after_sigkill_of_the_whole_run_redoes_only_unfinished_jobs(tmp_path):
    write_phantoms(tmp_path / "data")
    data = cohort_data(tmp_path)
    data["models"] = data["models"][:1]
    # slow enough jobs (~1 s each) to kill the run between two of them
    data["methods"] = [{"name": "occlusion", "params": {"window": 4, "stride": 4, "perturbations_per_eval": 1}}]
    cfg_path = tmp_path / "cohort.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    trace = tmp_path / "trace"
    env = {**os.environ, TRACE_ENV: str(trace), "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "esegeta_engine.cli", "run", str(cfg_path), "-q"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "out" / "manifest.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if manifest.is_file() and len(json.loads(manifest.read_text())["results"]) >= 1:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = {r["key"] for r in json.loads(manifest.read_text())["results"] if r["status"] == "ok"}
    assert 1 <= len(done_before) < 4, "the run must be killed mid-way"
    started_before = {p.name.split(".")[0] for p in trace.iterdir()}
    for p in trace.iterdir():
        p.unlink()
    assert subprocess.run([*cmd, "--resume"], env=env, stderr=subprocess.DEVNULL).returncode == 0
    rerun = [p.name.split(".")[0] for p in trace.iterdir()]
    final = json.loads(manifest.read_text())
    all_keys = {r["key"] for r in final["results"]}
    assert final["status"] == "completed" and len(all_keys) == 4 and final["resumed"] == len(done_before)
    assert sorted(rerun) == sorted(all_keys - done_before)  # each unfinished job once, finished ones never
    assert started_before >= done_before
