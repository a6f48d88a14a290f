"""--timeout as a real limit: a forward that never returns, the prediction pass, jobs that cannot fit.

Nothing here asserts wall-clock time: the tests count model calls, patch batches, files,
checksums and mtimes. They finish because the watchdog fires (pytest-timeout is the net).
"""

from __future__ import annotations

import hashlib
import json
import time

import nibabel as nib
import numpy as np
import pytest
import torch

import stuck_models
from esegeta_engine import timebudget, watchdog
from esegeta_engine.cli import main
from esegeta_engine.config import parse_config
from esegeta_engine.explain import JobFailed
from esegeta_engine.pipeline import run

AFFINE = np.diag([0.8, 0.8, 1.5, 1.0])


@pytest.fixture
def case(tmp_path):
    stuck_models.reset()
    torch.manual_seed(0)
    torch.save(stuck_models.TinySegNet(3).state_dict(), tmp_path / "model.pt")
    vol = np.random.default_rng(0).random((8, 10, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "vol.nii.gz")
    yield tmp_path
    stuck_models.RELEASE.set()  # never leave a thread blocked behind


def _config(tmp_path, model, methods, **over):
    data = {"model": {"path": "model.pt", "class_path": f"stuck_models:{model}", "kwargs": {"dims": 3}},
            "volumes": ["vol.nii.gz"], "target": {"kind": "argmax", "classes": [1]}, "methods": methods,
            "output": {"dir": "out"}, **over}
    return parse_config(data, base=tmp_path)


def _state(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.mark.timeout(300)
def test_a_forward_that_never_returns_is_abandoned_and_the_next_job_runs(case, monkeypatch):
    monkeypatch.setattr(watchdog, "grace_s", lambda timeout_s: 0.2)
    before = watchdog.abandoned_threads()
    cfg = _config(case, "StuckOnGradSegNet",
                  [{"name": "occlusion", "params": {"window": 4}},
                   {"name": "saliency"},  # blocks in its forward (input requires grad)
                   {"name": "occlusion", "params": {"window": 2}}],
                  run={"timeout_s": 1.0})
    out = case / "out"
    seen = {}

    def on_event(event):
        if isinstance(event, JobFailed):  # the first map exists: remember its bytes and mtime
            seen["first"] = _state(next(out.glob("vol__occlusion__*.nii.gz")))
            seen["calls_at_fail"] = stuck_models.CALLS["forward"]

    result = run(cfg, on_event=on_event)
    records = result.records
    assert [(r["method"], r["status"]) for r in records] == [("occlusion", "ok"), ("saliency", "timeout"),
                                                             ("occlusion", "ok")]
    assert "abandoned" in records[1]["error"] and "time limit of 1 s" in records[1]["error"]
    assert watchdog.abandoned_threads() == before + 1
    assert stuck_models.CALLS["blocked"] == 1 and stuck_models.CALLS["returned"] == 0
    assert stuck_models.CALLS["forward"] > seen["calls_at_fail"]  # the next job did run
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["status"] == "completed"
    first = out / records[0]["file"]
    assert _state(first) == seen["first"] and records[0]["sha256"] == seen["first"][0]
    files = sorted(p.name for p in out.iterdir())
    # let the abandoned forward return: it finds its job aborted and writes nothing
    stuck_models.RELEASE.set()
    for _ in range(200):
        if stuck_models.CALLS["returned"]:
            break
        time.sleep(0.05)
    assert stuck_models.CALLS["returned"] == 1
    time.sleep(0.2)
    assert sorted(p.name for p in out.iterdir()) == files
    assert _state(first) == seen["first"]
    assert json.loads(result.manifest_path.read_text()) == manifest


@pytest.mark.timeout(300)
def test_cli_run_with_a_stuck_forward_exits_with_the_maps_and_the_manifest(case, monkeypatch, capsys):
    monkeypatch.setattr(watchdog, "grace_s", lambda timeout_s: 0.2)
    cfg = {"model": {"path": "model.pt", "class_path": "stuck_models:StuckOnGradSegNet", "kwargs": {"dims": 3}},
           "volumes": ["vol.nii.gz"], "target": {"kind": "argmax", "classes": [1]},
           "methods": [{"name": "saliency"}, {"name": "occlusion", "params": {"window": 4}}],
           "output": {"dir": "out"}, "run": {"timeout_s": 1}}
    (case / "run.json").write_text(json.dumps(cfg))
    assert main(["run", str(case / "run.json"), "-q"]) == 1  # a job failed; the run finished
    manifest = json.loads((case / "out" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [r["status"] for r in manifest["results"]] == ["timeout", "ok"]
    assert (case / "out" / manifest["results"][1]["file"]).is_file()


def _sliding(tmp_path, timeout_s, **execution):
    return _config(tmp_path, "CountingSegNet", [{"name": "saliency"}], run={"timeout_s": timeout_s},
                   execution={"mode": "sliding_window", "patch_size": 2, "overlap": 0.0, "sw_batch_size": 1,
                              **execution})


class _FastForwardClock:
    """``time.monotonic`` that runs ``step`` seconds ahead per reading (a slow machine, counted)."""

    def __init__(self, step: float) -> None:
        self.step, self.calls = step, 0

    def monotonic(self) -> float:
        self.calls += 1
        return time.monotonic() + self.calls * self.step


@pytest.mark.timeout(300)
def test_a_prediction_pass_that_cannot_fit_is_refused_after_its_probe(case, monkeypatch, capsys):
    monkeypatch.setattr(timebudget, "time", _FastForwardClock(10.0))
    cfg = _sliding(case, 100.0)
    with pytest.raises(timebudget.TimeLimitError) as info:
        run(cfg)
    patches = 4 * 5 * 3  # (8, 10, 6) in patches of 2
    assert f"needs {patches} patches" in info.value.problem and "time limit of 100 s" in info.value.problem
    assert stuck_models.CALLS["forward"] == timebudget.PROBE_BATCHES  # refused right after the probe
    manifest = json.loads((case / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "needs 60 patches" in manifest["error"]
    assert not list((case / "out").glob("*saliency*"))


def test_the_cli_says_so_in_one_line(case, monkeypatch, capsys):
    monkeypatch.setattr(timebudget, "time", _FastForwardClock(10.0))
    cfg = {"model": {"path": "model.pt", "class_path": "stuck_models:CountingSegNet", "kwargs": {"dims": 3}},
           "volumes": ["vol.nii.gz"], "target": {"kind": "argmax", "classes": [1]}, "methods": [{"name": "saliency"}],
           "output": {"dir": "out"}, "run": {"timeout_s": 10},
           "execution": {"mode": "sliding_window", "patch_size": 2, "overlap": 0.0, "sw_batch_size": 1}}
    (case / "run.yaml").write_text(json.dumps(cfg))
    assert main(["run", str(case / "run.yaml"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the prediction pass needs 60 patches" in err and "fix:" in err


def test_a_pass_that_fits_is_not_refused(case, monkeypatch):
    monkeypatch.setattr(timebudget, "time", _FastForwardClock(0.001))
    result = run(_sliding(case, 100.0))
    assert [r["status"] for r in result.records] == ["ok"]


def test_a_job_whose_lower_bound_exceeds_the_limit_is_refused_before_it_starts(case, monkeypatch):
    import esegeta_engine.explain as explain

    real = explain.prediction_pass

    def slow_pass(fn, timeout_s, cancel=None):  # the pass ran, and (we pretend) took 15 s
        out, _ = real(fn, timeout_s, cancel)
        return out, 15.0

    monkeypatch.setattr(explain, "prediction_pass", slow_pass)
    cfg = _config(case, "CountingSegNet", [{"name": "saliency"},  # 1 evaluation: 15 s <= 2 x 10 s
                                           {"name": "occlusion", "params": {"window": 2}}],  # 16
                  run={"timeout_s": 10.0})
    calls = {}

    def on_event(event):
        if isinstance(event, JobFailed):
            calls["at_refusal"] = stuck_models.CALLS["forward"]

    result = run(cfg, on_event=on_event)
    saliency, ig = result.records
    assert saliency["status"] == "ok"
    assert ig["status"] == "timeout" and ig["model_evaluations"] == 0 and "not started" in ig["error"]
    assert f"{ig['expected_evaluations']} model evaluations" in ig["error"]
    assert stuck_models.CALLS["forward"] == calls["at_refusal"]  # no model call after the refusal


def test_refusal_rule():
    class Job:
        expected_evaluations = 100

    assert timebudget.refuse_job(Job(), 10.0, 1.0) is not None  # >= 100 s > 2 x 10 s
    assert timebudget.refuse_job(Job(), 60.0, 1.0) is None
    assert timebudget.refuse_job(Job(), 10.0, 1.0, fraction=0.1) is None  # a small support: 10 s
    assert timebudget.refuse_job(Job(), 10.0, 1.0, reuse=True) is None  # perturbation reuse
    assert timebudget.refuse_job(Job(), None, 1.0) is None
    assert timebudget.refuse_job(Job(), 0.1, timebudget.MIN_PASS_S / 2) is None  # start-up cost, not a rate
    Job.expected_evaluations = None
    assert timebudget.refuse_job(Job(), 10.0, 1.0) is None  # unknown cost: the deadline decides


@pytest.mark.timeout(600)
def test_the_command_exits_with_its_status_when_a_job_was_abandoned_in_cpp_code(case):
    """The abandoned thread is still inside torch's C++ code when the command ends."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg = {"model": {"path": "model.pt", "class_path": "stuck_models:SpinningSegNet", "kwargs": {"dims": 3}},
           "volumes": ["vol.nii.gz"], "target": {"kind": "argmax", "classes": [1]},
           "methods": [{"name": "saliency"}, {"name": "occlusion", "params": {"window": 4}}],
           "output": {"dir": "out"}, "run": {"timeout_s": 1}}
    (case / "run.json").write_text(json.dumps(cfg))
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parents[1] / "src"), str(here),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "esegeta_engine.cli", "run", str(case / "run.json"), "-q"],
                          capture_output=True, text=True, timeout=500, env=env, cwd=case)
    assert proc.returncode == 1, proc.stderr  # a job failed; not 134 (C++ terminate at shutdown)
    assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr
    manifest = json.loads((case / "out" / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert [r["status"] for r in manifest["results"]] == ["timeout", "ok"]
    assert "abandoned" in manifest["results"][0]["error"]


@pytest.mark.timeout(300)
def test_a_cohort_job_with_a_stuck_forward_is_abandoned_and_the_next_job_runs(case, monkeypatch):
    from esegeta_engine.cohort.config import parse_cohort_config
    from esegeta_engine.cohort.run import run_cohort

    monkeypatch.setattr(watchdog, "grace_s", lambda timeout_s: 0.2)
    cfg = parse_cohort_config({
        "models": [{"name": "stuck", "path": "model.pt", "class_path": "stuck_models:StuckOnGradSegNet",
                    "kwargs": {"dims": 3}}],
        "cohort": {"volumes": ["vol.nii.gz"], "executor": "inline"},
        "target": {"kind": "argmax", "classes": [1]},
        "methods": [{"name": "saliency"}, {"name": "occlusion", "params": {"window": 4}}],
        "run": {"timeout_s": 1.0}, "output": {"dir": "out"}}, base=case)
    result = run_cohort(cfg)
    status = {r["method"]: r for r in result.records}
    assert status["saliency"]["status"] == "timeout" and "abandoned" in status["saliency"]["error"]
    assert status["occlusion"]["status"] == "ok" and (case / "out" / status["occlusion"]["file"]).is_file()
    assert stuck_models.CALLS["blocked"] == 1 and stuck_models.CALLS["returned"] == 0
    assert json.loads((case / "out" / "manifest.json").read_text())["status"] == "completed"

