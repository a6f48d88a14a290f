"""--resume never replaces another run's maps (issue #18, part 1), and the shortened manifest
written on a full disk still lets --resume keep every finished map (part 2).

Each test checks the message and that the files which must survive are untouched (checksums
and modification times)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from esegeta_engine.cohort import parse_cohort_config, run_cohort
from esegeta_engine.config import parse_config
from esegeta_engine.errors import ConfigError, OutputError
from esegeta_engine.pipeline import run

from jobs_helpers import cohort_data, model_file, run_data, snapshot, volume_file


def _single(tmp_path: Path, methods=None, seed: int = 0):
    model = model_file(tmp_path / "in")
    volume = volume_file(tmp_path / "in", seed=seed)
    return parse_config(run_data(model, volume, tmp_path / "out", methods))


def test_another_scan_under_the_same_file_name_is_refused(tmp_path):
    cfg = _single(tmp_path)
    run(cfg)
    before = snapshot(tmp_path / "out")
    volume_file(tmp_path / "in", seed=7)  # another scan, same file name
    with pytest.raises(ConfigError, match="other volumes under the same names.*content differs"):
        run(_single(tmp_path, seed=7), resume=True)
    assert snapshot(tmp_path / "out") == before


def test_a_folder_whose_manifest_was_deleted_is_refused(tmp_path):
    cfg = _single(tmp_path)
    run(cfg)
    (tmp_path / "out" / "manifest.json").unlink()
    before = snapshot(tmp_path / "out")
    with pytest.raises(ConfigError, match="maps but no manifest") as err:
        run(cfg, resume=True)
    assert "--overwrite" in err.value.fix
    assert snapshot(tmp_path / "out") == before


def test_a_cohort_with_other_weights_under_the_same_model_name_is_refused(tmp_path):
    volume = volume_file(tmp_path / "in")
    data = cohort_data({"base": model_file(tmp_path / "in")}, [volume], tmp_path / "out")
    first = run_cohort(parse_cohort_config(data))
    assert first.status == "completed" and len(first.records) == 2
    before = snapshot(tmp_path / "out")
    model_file(tmp_path / "in", seed=5)  # other weights under the same path and model name
    with pytest.raises(ConfigError, match="other weights under the model name 'base'"):
        run_cohort(parse_cohort_config(data), resume=True)
    assert snapshot(tmp_path / "out") == before


def test_a_cohort_resumed_into_a_single_runs_folder_is_refused(tmp_path):
    cfg = _single(tmp_path)
    run(cfg)
    before = snapshot(tmp_path / "out")
    data = cohort_data({"base": tmp_path / "in" / "seg.pt"}, [tmp_path / "in" / "vol.nii.gz"], tmp_path / "out")
    with pytest.raises(ConfigError, match="holds a single run, not a cohort"):
        run_cohort(parse_cohort_config(data), resume=True)
    assert snapshot(tmp_path / "out") == before


def test_resuming_with_fewer_methods_keeps_the_other_maps_recorded(tmp_path):
    run(_single(tmp_path))
    before = snapshot(tmp_path / "out")
    result = run(_single(tmp_path, methods=[{"name": "saliency"}]), resume=True)
    recorded = {r["file"]: r for r in result.records}
    dropped = [f for f in before if "input_x_gradient" in f]
    assert len(dropped) == 1 and recorded[dropped[0]]["planned"] is False
    assert recorded[dropped[0]]["resumed"] is True
    after = snapshot(tmp_path / "out")
    for f, state in before.items():
        if f.endswith(".nii.gz"):  # every map: byte-identical and not rewritten
            assert after[f] == state
    on_disk = {p.name for p in (tmp_path / "out").glob("*.nii.gz")}
    assert on_disk == set(recorded)  # no map on disk that the manifest does not record


def test_a_map_symlinked_elsewhere_is_redone_not_kept(tmp_path):
    cfg = _single(tmp_path)
    first = run(cfg)
    name = first.records[0]["file"]
    elsewhere = tmp_path / "elsewhere.nii.gz"
    (tmp_path / "out" / name).rename(elsewhere)
    (tmp_path / "out" / name).symlink_to(elsewhere)
    outside = snapshot(tmp_path)["elsewhere.nii.gz"]
    result = run(cfg, resume=True)
    kept = [bool(r.get("resumed")) for r in result.records]
    assert kept == [False, True]  # the linked map is computed again, the other one is kept
    assert not (tmp_path / "out" / name).is_symlink() and (tmp_path / "out" / name).is_file()
    assert snapshot(tmp_path)["elsewhere.nii.gz"] == outside  # the file the link pointed at is untouched


def test_a_record_pointing_outside_the_folder_is_not_accepted(tmp_path):
    cfg = _single(tmp_path)
    first = run(cfg)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    escape = tmp_path / "escape.nii.gz"
    escape.write_bytes((tmp_path / "out" / first.records[0]["file"]).read_bytes())
    manifest["results"][0]["file"] = "../escape.nii.gz"  # checksum matches the escaped copy
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    outside = snapshot(tmp_path)["escape.nii.gz"]
    result = run(cfg, resume=True)
    assert [bool(r.get("resumed")) for r in result.records] == [False, True]
    assert all(not r["file"].startswith("..") for r in result.records)
    assert snapshot(tmp_path)["escape.nii.gz"] == outside


def test_an_older_key_scheme_is_said_and_redone_never_reused(tmp_path, caplog):
    cfg = _single(tmp_path)
    run(cfg)
    path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("key_version")  # as written before the keys of single runs and cohorts were unified
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="esegeta_engine"):
        result = run(cfg, resume=True)
    assert "job keys differ" in caplog.text and "every job runs again" in caplog.text
    assert [bool(r.get("resumed")) for r in result.records] == [False, False]


def test_after_a_full_disk_resume_redoes_only_what_did_not_finish(tmp_path, monkeypatch):
    import esegeta_engine.pipeline as pipeline
    import esegeta_engine.runguard as runguard

    cfg = _single(tmp_path, methods=[{"name": "saliency"}, {"name": "input_x_gradient"},
                                     {"name": "integrated_gradients", "params": {"n_steps": 4}}])
    real_save, real_write = pipeline.save_map, runguard.write_json
    full = {"now": False}

    def save_map(array, like, path, **kw):
        if "integrated_gradients" in Path(path).name:
            full["now"] = True
            raise OutputError(f"the disk is full: cannot write {path}", "free some space")
        return real_save(array, like, path, **kw)

    def write_json(data, path):
        if full["now"]:
            raise OutputError(f"the disk is full: cannot write {path}", "free some space")
        return real_write(data, path)

    monkeypatch.setattr(pipeline, "save_map", save_map)
    monkeypatch.setattr(runguard, "write_json", write_json)
    with pytest.raises(OutputError, match="disk is full"):
        run(cfg)
    monkeypatch.undo()
    short = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "manifest shortened" in short["error"] and short["status"] == "failed"
    assert short["model_key"] and short["key_version"] and short["volumes"][0]["content"]
    finished = [r for r in short["results"] if r["status"] == "ok"]
    assert len(finished) == 2 and all(r["key"] and r["sha256"] and r["file"] for r in finished)
    maps = {f: s for f, s in snapshot(tmp_path / "out").items() if f.endswith(".nii.gz")}
    result = run(cfg, resume=True)
    assert [bool(r.get("resumed")) for r in result.records] == [True, True, False]
    after = snapshot(tmp_path / "out")
    assert all(after[f] == s for f, s in maps.items())  # the finished maps were kept, not recomputed
    assert result.status == "completed" and os.path.exists(tmp_path / "out" / result.records[2]["file"])
