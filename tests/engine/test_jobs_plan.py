"""A run is a cohort of one: one key function, one record, the same map (issue #15, part 1)."""

from __future__ import annotations

import gzip

import numpy as np

from esegeta_engine.cohort import parse_cohort_config, plan_cohort, run_cohort
from esegeta_engine.config import parse_config
from esegeta_engine.jobs.plan import KEY_VERSION, job_key, key_context
from esegeta_engine.jobs.record import MapRecord
from esegeta_engine.pipeline import run

from jobs_helpers import cohort_data, model_file, run_data, volume_file


def test_single_run_and_one_volume_cohort_share_key_record_and_map(tmp_path):
    model, volume = model_file(tmp_path / "in"), volume_file(tmp_path / "in")
    single = run(parse_config(run_data(model, volume, tmp_path / "single")))
    cohort = run_cohort(parse_cohort_config(cohort_data({"m": model}, [volume], tmp_path / "cohort")))
    assert single.status == cohort.status == "completed"
    by_method = {r["method"]: r for r in cohort.records}
    assert len(single.records) == len(by_method) == 2
    for rec in single.records:
        other = by_method[rec["method"]]
        assert rec["key"] == other["key"] and len(rec["key"]) == 64  # identical work, one key
        a, b = MapRecord.from_json(rec), MapRecord.from_json(other)  # one record type for both
        assert (a.method, a.layer, a.target, a.cls, a.params, a.status) == \
            (b.method, b.layer, b.target, b.cls, b.params, b.status)
        # byte-identical maps (the gzip wrapper aside: compare the NIfTI bytes)
        first = gzip.decompress((tmp_path / "single" / rec["file"]).read_bytes())
        second = gzip.decompress((tmp_path / "cohort" / other["file"]).read_bytes())
        assert first == second
    # the cohort planner knows the key before any model runs
    planned = {j.key for j in plan_cohort(parse_cohort_config(cohort_data({"m": model}, [volume],
                                                                           tmp_path / "x"))).jobs}
    assert planned == {r["key"] for r in single.records}


def _maps(folder, records):
    """method -> (key, NIfTI bytes of its map)."""
    return {r["method"]: (r["key"], gzip.decompress((folder / r["file"]).read_bytes())) for r in records}


def test_esegeta_run_goes_through_the_executor_seam_like_a_cohort_of_one(tmp_path, monkeypatch):
    """`esegeta run` (inline and --executor pool) and a one-volume cohort: same keys, same map bytes."""
    import json

    import yaml

    from esegeta_engine.cli import main
    from esegeta_engine.jobs.worker import TRACE_ENV

    model, volume = model_file(tmp_path / "in"), volume_file(tmp_path / "in")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_data(model, volume, tmp_path / "unused")))
    maps = {}
    for name, flags in (("inline", []), ("pool", ["--executor", "pool"])):
        monkeypatch.setenv(TRACE_ENV, str(tmp_path / f"trace-{name}"))  # a file per job a worker starts
        assert main(["run", str(config), "--out", str(tmp_path / name), "-q", *flags]) == 0
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["config"]["execution"]["executor"] == name
        assert [r["status"] for r in manifest["results"]] == ["ok", "ok"]
        maps[name] = _maps(tmp_path / name, manifest["results"])
    monkeypatch.delenv(TRACE_ENV)
    cohort = run_cohort(parse_cohort_config(cohort_data({"m": model}, [volume], tmp_path / "cohort")))
    maps["cohort"] = _maps(tmp_path / "cohort", cohort.records)
    assert maps["inline"] == maps["pool"] == maps["cohort"] and len(maps["inline"]) == 2
    # inline: the jobs ran here on the loaded model; pool: each job went to a worker as a JobSpec
    assert not (tmp_path / "trace-inline").exists() and len(list((tmp_path / "trace-pool").iterdir())) == 2
    # the executor is not part of the key: a pool run resumes an inline run's folder, redoing nothing
    assert main(["run", str(config), "--out", str(tmp_path / "inline"), "-q", "--resume",
                 "--executor", "pool"]) == 0
    resumed = json.loads((tmp_path / "inline" / "manifest.json").read_text())["results"]
    assert [r.get("resumed") for r in resumed] == [True, True]


def test_a_registered_executor_is_one_registration(tmp_path, monkeypatch):
    """register_executor: accepted by config validation and --executor, and it runs the jobs."""
    import pytest
    import yaml

    from esegeta_engine.cli import build_parser, main
    from esegeta_engine.errors import ConfigError
    from esegeta_engine.jobs import registry
    from esegeta_engine.jobs.worker import execute_job

    ran: list[str] = []

    class Toy:  # the seam: map(specs) -> outcomes, close()
        name, description = "toy", "toy (a test executor)"

        def map(self, specs):
            for spec in specs:
                ran.append(spec.key)
                yield execute_job(spec)

        def close(self):
            pass

    model, volume = model_file(tmp_path / "in"), volume_file(tmp_path / "in")
    with pytest.raises(ConfigError, match="unknown executor 'toy'"):
        parse_config({**run_data(model, volume, tmp_path / "x"), "execution": {"executor": "toy"}})
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the registration ends with the test
    registry.register_executor("toy", lambda settings, cancel: Toy())
    assert build_parser().parse_args(["run", "c.yaml", "--executor", "toy"]).executor == "toy"
    cfg = parse_config({**run_data(model, volume, tmp_path / "single"), "execution": {"executor": "toy"}})
    single = run(cfg)
    assert single.status == "completed" and sorted(ran) == sorted(r["key"] for r in single.records)
    data = cohort_data({"m": model}, [volume], tmp_path / "cohort")
    data["cohort"]["executor"] = "toy"
    cohort = run_cohort(parse_cohort_config(data))
    assert cohort.status == "completed" and len(ran) == 4
    assert _maps(tmp_path / "single", single.records) == _maps(tmp_path / "cohort", cohort.records)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_data(model, volume, tmp_path / "cli")))
    assert main(["run", str(config), "-q", "--executor", "toy"]) == 0 and len(ran) == 6


def test_job_key_is_stable_and_covers_each_part():
    context = key_context({"kind": "argmax", "classes": [1, 2], "roi_mask": "/a/roi.nii.gz"},
                          {"normalisation": "zscore"}, {"mode": "whole"}, None, 0, "m" * 64, ["v" * 64])
    key = job_key("saliency", {"abs": True}, None, None, 1, context)
    # version 2 of the scheme: pinned so that an accidental change (which would make --resume redo
    # every finished map) fails here; a deliberate one bumps KEY_VERSION
    assert KEY_VERSION == 2
    assert key == "1888988c7f851eb983cd267ca495c13a99bc14ede345d56d81aac4159f108a6a"
    assert key == job_key("saliency", {"abs": True}, None, None, 1,
                          key_context({"kind": "argmax", "classes": [1], "roi_mask": "/b/roi.nii.gz"},
                                      {"normalisation": "zscore"}, {"mode": "whole"}, None, 0, "m" * 64,
                                      ["v" * 64]))  # the class list and the ROI's path are not part of it
    changed = [
        job_key("saliency", {"abs": False}, None, None, 1, context),
        job_key("saliency", {"abs": True}, "conv1", None, 1, context),
        job_key("saliency", {"abs": True}, None, {"type": "smoothgrad", "samples": 2}, 1, context),
        job_key("saliency", {"abs": True}, None, None, 2, context),
        job_key("saliency", {"abs": True}, None, None, 1, {**context, "model": "n" * 64}),
        job_key("saliency", {"abs": True}, None, None, 1, {**context, "volumes": ["w" * 64]}),
        job_key("saliency", {"abs": True}, None, None, 1, {**context, "roi": "r" * 64}),
        job_key("saliency", {"abs": True}, None, None, 1, {**context, "execution": {"mode": "sliding"}}),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_map_record_round_trips_with_unknown_fields():
    data = {"key": "k" * 64, "method": "saliency", "layer": None, "target": "argmax-1", "class": 1,
            "noise_tunnel": None, "params": {"abs": True}, "status": "ok", "seconds": 0.5,
            "model_evaluations": 1, "expected_evaluations": 1, "volume": "vol", "file": "vol__saliency.nii.gz",
            "sha256": "s" * 64, "metrics": {"x": np.float64(1.0).item()}, "future_field": [1, 2]}
    rec = MapRecord.from_json(data)
    assert rec.cls == 1 and rec.ok and rec.extra == {"future_field": [1, 2]}
    assert rec.to_json() == data
    assert MapRecord.from_json(rec.to_json()) == rec
