"""A single run's jobs sent to a non-inline executor: folder models travel as a cohort's do (issue #15)."""

from __future__ import annotations

import gzip
import json

import pytest
import yaml

from esegeta_engine.cli import main
from esegeta_engine.jobs.worker import TRACE_ENV

pytest.importorskip("nnunetv2")

import bundle_setup as B  # noqa: E402


def _run(tmp_path, monkeypatch, model: dict, name: str, flags: list[str]) -> dict:
    """``esegeta run`` of saliency on the oblique scan; the manifest (every job traced)."""
    scan = tmp_path / "scan.nii.gz"
    if not scan.exists():
        B.oblique_scan(scan)
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"model": model, "volumes": [str(scan)],
                                      "target": {"kind": "argmax", "classes": [1]}, "methods": [{"name": "saliency"}],
                                      "output": {"dir": str(tmp_path / name), "save_prediction": False},
                                      "evaluation": {"report": False}}))
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / f"trace-{name}"))
    assert main(["run", str(config), "-q", *flags]) == 0
    monkeypatch.delenv(TRACE_ENV)
    return json.loads((tmp_path / name / "manifest.json").read_text())


def _map_bytes(folder, manifest) -> bytes:
    (rec,) = manifest["results"]
    assert rec["status"] == "ok"
    return gzip.decompress((folder / rec["file"]).read_bytes())


def test_nnunet_folder_single_run_with_a_pool_equals_the_inline_run(nnunet_folder, tmp_path, monkeypatch):
    model = {"nnunet": str(nnunet_folder), "folds": [0], "mirroring": False}
    inline = _run(tmp_path, monkeypatch, model, "inline", [])
    pool = _run(tmp_path, monkeypatch, model, "pool", ["--executor", "pool"])
    assert pool["config"]["execution"]["executor"] == "pool"
    assert inline["results"][0]["key"] == pool["results"][0]["key"]
    assert pool["results"][0]["execution"]["pipeline"] == "nnunet"  # the worker ran nnU-Net's own pipeline
    assert _map_bytes(tmp_path / "inline", inline) == _map_bytes(tmp_path / "pool", pool)
    # the job went to a worker as a JobSpec (one trace file); inline ran it on the loaded model
    assert len(list((tmp_path / "trace-pool").iterdir())) == 1 and not (tmp_path / "trace-inline").exists()


def test_bundle_single_run_with_a_pool_takes_trust_bundle_to_the_worker(tmp_path, monkeypatch, capsys):
    model = {"bundle": str(B.write_bundle(tmp_path / "bundle"))}
    # without the flag the bundle is refused in one line, before any job is sent
    scan = B.oblique_scan(tmp_path / "scan.nii.gz")
    config = tmp_path / "refused.yaml"
    config.write_text(yaml.safe_dump({"model": model, "volumes": [str(scan)], "methods": [{"name": "saliency"}],
                                      "output": {"dir": str(tmp_path / "refused")}}))
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace-refused"))
    assert main(["run", str(config), "-q", "--executor", "pool"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--trust-bundle" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "trace-refused").exists() and not (tmp_path / "refused").exists()
    inline = _run(tmp_path, monkeypatch, model, "inline", ["--trust-bundle"])
    pool = _run(tmp_path, monkeypatch, model, "pool", ["--trust-bundle", "--executor", "pool"])
    assert pool["results"][0]["execution"]["pipeline"] == "bundle"
    assert inline["results"][0]["key"] == pool["results"][0]["key"]
    assert _map_bytes(tmp_path / "inline", inline) == _map_bytes(tmp_path / "pool", pool)
    assert len(list((tmp_path / "trace-pool").iterdir())) == 1


def test_pool_jobs_bring_back_the_curves_and_stability_map_an_inline_run_writes(tmp_path):
    """curves.json and the stability spread map: the same bytes from inline and pool runs, and a cohort's."""
    from esegeta_engine.cohort import parse_cohort_config, run_cohort
    from esegeta_engine.config import parse_config
    from esegeta_engine.pipeline import run

    from jobs_helpers import cohort_data, model_file, run_data, volume_file

    model, volume = model_file(tmp_path / "in"), volume_file(tmp_path / "in")
    evaluation = {"report": False, "faithfulness": {"steps": 4}, "stability": {"samples": 2}}
    records, curves = {}, {}
    for name in ("inline", "pool"):
        data = {**run_data(model, volume, tmp_path / name), "evaluation": evaluation,
                "execution": {"executor": name}}
        result = run(parse_config(data))
        assert result.status == "completed" and len(result.records) == 2
        records[name] = result.records
        curves[name] = json.loads((tmp_path / name / "curves.json").read_text())
    assert curves["inline"] == curves["pool"]
    assert set(curves["pool"]) == {r["file"] for r in records["pool"]} and len(curves["pool"]) == 2
    for a, b in zip(records["inline"], records["pool"]):
        assert a["stability_map"] == b["stability_map"]
        first = gzip.decompress((tmp_path / "inline" / a["stability_map"]).read_bytes())
        assert first == gzip.decompress((tmp_path / "pool" / b["stability_map"]).read_bytes())
    # a cohort (its inline executor also sends JobSpecs) writes the same curves and spread maps
    data = cohort_data({"m": model}, [volume], tmp_path / "cohort")
    cohort = run_cohort(parse_cohort_config({**data, "evaluation": evaluation}))
    mine = json.loads((tmp_path / "cohort" / "curves.json").read_text())
    by_key = {r["key"]: r for r in cohort.records}
    for rec in records["inline"]:
        other = by_key[rec["key"]]
        assert mine[other["file"]] == curves["inline"][rec["file"]]
        assert gzip.decompress((tmp_path / "cohort" / other["stability_map"]).read_bytes()) == \
            gzip.decompress((tmp_path / "inline" / rec["stability_map"]).read_bytes())
