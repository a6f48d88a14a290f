"""``esegeta evaluate RUN_DIR --randomisation MODE`` (issue 19.9): the model-randomisation check of a finished
run's maps, written to the manifest and ``randomisation.json``, on the run's target and sliding window,
with the maps themselves untouched."""

from __future__ import annotations

import hashlib
import json

import pytest

from test_evaluation_session import _sliding_run


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_evaluate_run_dir_with_randomisation(tmp_path, mode) -> None:
    from esegeta_engine.cli import main

    _, result, records = _sliding_run(tmp_path)
    out = result.out_dir
    maps = {r["file"]: _digest(out / r["file"]) for r in records if r.get("file")}
    assert "randomisation" not in json.loads(result.manifest_path.read_text())
    assert main(["evaluate", str(out), "--randomisation", mode, "-q"]) == 0
    manifest = json.loads(result.manifest_path.read_text())
    entries = manifest["randomisation"]
    assert entries and {e["mode"] for e in entries} == {mode}
    verdicts = {m: v for e in entries for m, v in (e.get("verdicts") or {}).items()}
    assert {"saliency", "integrated_gradients"} <= set(verdicts), entries
    assert all(v.get("verdict") for v in verdicts.values())
    assert (out / "randomisation.json").is_file()
    assert manifest["evaluations"][-1]["evaluation"]["randomisation"]["mode"] == mode
    assert {f: _digest(out / f) for f in maps} == maps  # the maps are read, never rewritten
