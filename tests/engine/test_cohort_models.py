"""nnU-Net folders and MONAI bundles as cohort models: the same keys, records and maps as single runs."""

from __future__ import annotations

import gzip
import json

import pytest

pytest.importorskip("nnunetv2")

import bundle_setup as B  # noqa: E402

from esegeta_engine.cli import main  # noqa: E402
from esegeta_engine.config import parse_config  # noqa: E402
from esegeta_engine.pipeline import run  # noqa: E402


def _models(nnunet_folder, bundle):
    return {"nn": {"nnunet": str(nnunet_folder), "folds": [0], "mirroring": False}, "bun": {"bundle": str(bundle)}}


def _common(scan):
    return {"target": {"kind": "argmax", "classes": [1]}, "methods": [{"name": "saliency"}]}


def test_nnunet_folder_and_bundle_as_cohort_models_equal_single_runs(nnunet_folder, tmp_path, capsys):
    bundle = B.write_bundle(tmp_path / "bundle")
    scan = B.oblique_scan(tmp_path / "scan.nii.gz")
    models = _models(nnunet_folder, bundle)
    cfg = tmp_path / "cohort.json"
    cfg.write_text(json.dumps({"models": [{"name": k, **v} for k, v in models.items()],
                               "cohort": {"volumes": [str(scan)]}, **_common(scan),
                               "output": {"dir": str(tmp_path / "cohort")}}))
    # without --trust-bundle the bundle is refused in one line before anything is written
    assert main(["run", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "would run Python" in err and "--trust-bundle" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cohort").exists()
    assert main(["run", str(cfg), "--trust-bundle", "-q"]) == 0
    manifest = json.loads((tmp_path / "cohort" / "manifest.json").read_text())
    assert [m["name"] for m in manifest["models"]] == ["nn", "bun"]
    assert {m["path"] for m in manifest["models"]} == {str(nnunet_folder), str(bundle)}
    by_model = {r["model"]: r for r in manifest["results"]}
    assert set(by_model) == {"nn", "bun"} and all(r["status"] == "ok" for r in by_model.values())
    for rec in by_model.values():  # planned (before any network ran) == counted, as in single runs
        ex = rec["execution"]
        ran = ex["forward_network_calls"] + ex.get("reused_network_calls", 0)
        assert rec["expected_network_evaluations"] == ran == ex["network_calls_per_input"] > 0
    for name, model in models.items():  # a single run is a cohort of one: one key, the same map
        single = run(parse_config({"model": model, "volumes": [str(scan)], **_common(scan),
                                   "output": {"dir": str(tmp_path / name)}}), trust_bundle=True)
        (rec,) = single.records
        other = by_model[name]
        assert rec["key"] == other["key"]
        assert rec["expected_network_evaluations"] == other["expected_network_evaluations"]
        assert rec["execution"]["pipeline"] == ("nnunet" if name == "nn" else "bundle")
        first = gzip.decompress((tmp_path / name / rec["file"]).read_bytes())
        second = gzip.decompress((tmp_path / "cohort" / other["file"]).read_bytes())
        assert first == second
