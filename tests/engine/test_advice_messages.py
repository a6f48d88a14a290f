"""The smaller messages of issue 18: bf16 clashes, malformed scheduler addresses, reruns into killed runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import stuck_models
from esegeta_engine.cli import main
from esegeta_engine.config import parse_config
from esegeta_engine.errors import ConfigError, MethodError
from esegeta_engine.pipeline import run


@pytest.fixture
def case(tmp_path):
    torch.manual_seed(0)
    torch.save(stuck_models.TinySegNet(3).state_dict(), tmp_path / "model.pt")
    vol = np.random.default_rng(0).random((8, 10, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    return tmp_path


def _cfg(tmp_path, model="TinySegNet", **over):
    return parse_config({"model": {"path": "model.pt", "class_path": f"stuck_models:{model}", "kwargs": {"dims": 3}},
                         "volumes": ["vol.nii.gz"], "target": {"kind": "argmax", "classes": [1]},
                         "methods": [{"name": "saliency"}], "output": {"dir": "out"}, **over}, base=tmp_path)


@pytest.mark.parametrize("mode", [{"mode": "sliding_window", "patch_size": 4}, {"mode": "whole"}])
def test_bf16_clash_names_the_precision_not_the_patch_size(case, mode):
    cfg = _cfg(case, "AutocastClashSegNet", execution={"precision": "bf16", **mode})
    with pytest.raises(MethodError) as info:
        run(cfg)
    assert "bf16 autocast" in info.value.problem and "patch" not in info.value.problem
    assert "precision: fp32" in info.value.fix
    assert run(_cfg(case, "AutocastClashSegNet", execution={"precision": "fp32", **mode},
                    output={"dir": "out2"})).status == "completed"  # the model itself is fine


def test_malformed_scheduler_address_is_one_line_and_no_client_is_made(tmp_path, monkeypatch, capsys):
    import distributed

    made = []
    monkeypatch.setattr(distributed, "Client", lambda *a, **k: made.append(a))
    from esegeta_engine.jobs.executors import connect

    for address in ["not an address", "tcp://host:notaport", "foo://bar:1", "tcp://h:99999", "tcp://:8786"]:
        with pytest.raises(ConfigError, match="is not valid") as info:
            connect(address)
        assert "tcp://HOST:PORT" in info.value.fix
    assert made == []


def test_cli_malformed_scheduler_address_prints_one_line_and_nothing_else(tmp_path):
    from cohort_helpers import cohort_data, write_phantoms

    import yaml

    write_phantoms(tmp_path / "data", n=1)
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(cohort_data(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "esegeta_engine.cli", "run", str(tmp_path / "cohort.yaml"),
                           "--executor", "dask", "--scheduler", "not an address"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the Dask scheduler address 'not an address'"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_rerun_into_a_killed_runs_folder_says_resume_and_overwrite(case, capsys):
    out = case / "out"
    out.mkdir()
    kept = out / "vol__saliency__argmax-class1.nii.gz"
    kept.write_bytes(b"finished map")
    digest = hashlib.sha256(kept.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps({"status": "running", "results": [
        {"method": "saliency", "status": "ok", "file": kept.name, "sha256": digest}]}))
    before = (kept.stat().st_mtime_ns, (out / "manifest.json").stat().st_mtime_ns)
    (case / "run.json").write_text(json.dumps(_cfg(case).model_dump(mode="json")))
    assert main(["run", str(case / "run.json"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds an unfinished run" in err and "'running'" in err
    assert "--resume" in err and "--overwrite" in err
    assert (kept.stat().st_mtime_ns, (out / "manifest.json").stat().st_mtime_ns) == before
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == digest
