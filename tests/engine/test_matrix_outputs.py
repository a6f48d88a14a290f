"""Fault matrix, groups 2 and 6 (issue 10): nothing lost — the output folder's lock, inputs never
overwritten, no writes before the checks, the demo, SIGTERM, .part leftovers, the log, reruns."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import nibabel as nib
import numpy as np
import pytest

from esegeta_engine.cli import main
from esegeta_engine.errors import ConfigError, OutputError, TargetError, VolumeError
from esegeta_engine.pipeline import iter_run, run
from matrix_setup import AFFINE, SLOW, cli, config, make_case, write_config


@pytest.fixture
def case(tmp_path):
    return make_case(tmp_path)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- group 2: silent loss of results and inputs -------------------------------------------

def test_g2_second_run_into_a_folder_in_use_is_refused_and_told_who_holds_it(case):
    first = iter_run(config(case, [{"name": "saliency"}, {"name": "occlusion", "params": {"window": 2}}],
                            model=SLOW))
    next(first)  # the first run has started: it holds the folder
    with pytest.raises(OutputError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        run(config(case, output={"overwrite": True}))
    for _ in first:
        pass
    manifest = json.loads((case / "out" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(manifest["results"]) == 2
    assert not (case / "out" / ".esegeta.lock").exists()  # released when the run ends
    run(config(case, output={"overwrite": True}))  # and the folder is free again


def test_g2_stale_lock_of_a_dead_process_is_taken_over(case):
    (case / "out").mkdir()
    (case / "out" / ".esegeta.lock").write_text(json.dumps(
        {"pid": 999999999, "host": "gone", "started": "2020-01-01T00:00:00+00:00"}))
    assert run(config(case)).status == "completed"


def test_g2_an_input_in_the_output_folder_is_never_modified(case):
    out = case / "out"
    out.mkdir()
    mask = np.zeros((8, 10, 6), np.uint8)
    mask[2:5, 3:6, 1:4] = 1
    roi = out / "vol__prediction.nii.gz"  # the name the run gives its prediction
    nib.save(nib.Nifti1Image(mask, AFFINE), roi)
    before = _sha(roi)
    with pytest.raises(OutputError, match="vol__prediction.nii.gz.*would be overwritten"):
        run(config(case, target={"kind": "roi", "roi_mask": "out/vol__prediction.nii.gz"}))
    assert _sha(roi) == before and sorted(p.name for p in out.iterdir()) == ["vol__prediction.nii.gz"]


def test_g2_a_failing_run_writes_nothing_over_a_previous_run(case):
    run(config(case))
    manifest = case / "out" / "manifest.json"
    before = _sha(manifest)
    (case / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(VolumeError):
        run(config(case, volumes=["bad.nii.gz"], output={"overwrite": True}))
    assert _sha(manifest) == before


def test_g2_demo_does_not_replace_another_run(case, capsys):
    run(config(case))
    manifest = case / "out" / "manifest.json"
    before = _sha(manifest)
    assert main(["demo", "--out", str(case / "out"), "--methods", "saliency", "--no-report", "-q"]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert _sha(manifest) == before and not (case / "out" / "input").exists()


# ---- group 6: interruptions ------------------------------------------------------------------

def _start_slow_run(case, *extra):
    """A CLI run whose second method is slow; returns the process once the first map exists."""
    cfg = write_config(case, methods=[{"name": "saliency"},
                                      {"name": "occlusion", "params": {"window": 1, "perturbations_per_eval": 1}}],
                       model={**SLOW, "kwargs": {"dims": 3, "delay": 0.05}}, run={"timeout_s": 120})
    proc = cli(["run", str(cfg), "-q", *extra], cwd=case)
    first_map = case / "out" / "vol__saliency__argmax-class1.nii.gz"
    deadline = time.monotonic() + 120
    while not first_map.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # occlusion is running now
    assert proc.poll() is None, proc.communicate()
    return proc, first_map


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_g6_sigterm_ends_like_ctrl_c(case, sig):
    proc, first_map = _start_slow_run(case)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    manifest = json.loads((case / "out" / "manifest.json").read_text())
    assert manifest["status"] == "cancelled"
    assert [(r["method"], r["status"]) for r in manifest["results"]] == [("saliency", "ok"),
                                                                         ("occlusion", "cancelled")]
    assert np.isfinite(np.asarray(nib.load(first_map).dataobj)).all()
    assert not (case / "out" / ".esegeta.lock").exists()


def test_g6_sigkill_keeps_maps_and_its_stale_lock_is_taken_over(case):
    proc, first_map = _start_slow_run(case)
    proc.kill()
    proc.communicate(timeout=30)
    assert np.isfinite(np.asarray(nib.load(first_map).dataobj)).all()  # atomic: complete or absent
    assert json.loads((case / "out" / ".esegeta.lock").read_text())["pid"] == proc.pid
    with pytest.raises(ConfigError, match="holds an unfinished run .*'running'.* 1 finished map") as info:
        run(config(case))  # it wrote a map: not replaced silently
    assert "--resume" in info.value.fix and "--overwrite" in info.value.fix
    assert run(config(case, output={"overwrite": True})).status == "completed"  # dead holder: taken over


def test_g6_part_leftovers_are_removed_by_the_next_run(case):
    out = case / "out"
    out.mkdir()
    left = [out / ".vol__saliency__argmax-class1.nii.gz.k3j_x9a1.part.nii.gz", out / ".manifest.json.ab12cd34.part"]
    for p in left:
        p.write_bytes(b"half a file")
    keep = out / "notes.part.txt"  # not one of ours
    keep.write_text("mine")
    run(config(case))
    assert not any(p.exists() for p in left) and keep.read_text() == "mine"


def test_g6_log_is_not_written_through_a_symlink(case):
    out = case / "out"
    out.mkdir()
    victim = case / "victim.txt"
    victim.write_text("precious\n")
    (out / "esegeta.log").symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        run(config(case))
    assert victim.read_text() == "precious\n"


def test_g6_failed_run_without_maps_does_not_block_a_rerun(case):
    with pytest.raises(TargetError):
        run(config(case, target={"classes": [7]}))  # fails after the prediction, before any map
    assert json.loads((case / "out" / "manifest.json").read_text())["status"] == "failed"
    assert run(config(case)).status == "completed"  # same folder, no --overwrite
