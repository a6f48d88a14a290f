"""Cohort folders get the safeguards of single runs from the same code (issue #18, part 4):
the lock, the ``.part`` cleanup, SIGTERM handling and a log that never follows a link."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from esegeta_engine.cohort import parse_cohort_config, run_cohort
from esegeta_engine.errors import OutputError
from esegeta_engine.runguard import OutputLock

from jobs_helpers import cohort_data, model_file, snapshot, volume_file


def _cohort(tmp_path, methods=None, n=1):
    volumes = [volume_file(tmp_path / "in", f"s{i}.nii.gz", seed=i) for i in range(n)]
    return cohort_data({"base": model_file(tmp_path / "in")}, volumes, tmp_path / "out", methods)


def test_a_cohort_folder_in_use_is_refused(tmp_path):
    data = _cohort(tmp_path)
    run_cohort(parse_cohort_config(data))
    before = snapshot(tmp_path / "out")
    with OutputLock(tmp_path / "out"):  # another run holds the folder
        with pytest.raises(OutputError, match="in use by another run"):
            run_cohort(parse_cohort_config(data), resume=True)
    after = snapshot(tmp_path / "out")
    assert {f: s for f, s in after.items() if f != ".esegeta.lock"} == before


def test_part_leftovers_of_an_interrupted_cohort_are_removed(tmp_path):
    data = _cohort(tmp_path)
    first = run_cohort(parse_cohort_config(data))
    maps = {f: s for f, s in snapshot(tmp_path / "out").items() if f.startswith("maps/")}  # aggregates are redone
    leftover = tmp_path / "out" / "maps" / "base" / ".s0__saliency__argmax-1.nii.gz.abc123.part.nii.gz"
    leftover.write_bytes(b"half a map")
    again = run_cohort(parse_cohort_config(data), resume=True)
    assert not leftover.exists()
    assert again.skipped == len(first.records) == 2
    after = snapshot(tmp_path / "out")
    assert all(after[f] == s for f, s in maps.items())


def test_a_cohort_log_never_follows_a_link(tmp_path):
    data = _cohort(tmp_path)
    (tmp_path / "out").mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("not yours\n")
    (tmp_path / "out" / "esegeta.log").symlink_to(target)
    state = snapshot(tmp_path)["elsewhere.txt"]
    with pytest.raises(OutputError, match="symbolic link"):
        run_cohort(parse_cohort_config(data))
    assert snapshot(tmp_path)["elsewhere.txt"] == state
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_sigterm_cancels_a_cohort_and_keeps_its_finished_maps(tmp_path):
    slow = [{"name": "occlusion", "params": {"window": 1, "perturbations_per_eval": 1}}]
    data = _cohort(tmp_path, slow, n=3)
    cfg_path = tmp_path / "cohort.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "esegeta_engine.cli", "run", str(cfg_path), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = tmp_path / "out" / "manifest.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if any(r["status"] == "ok" for r in json.loads(manifest.read_text())["results"]):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the cohort wrote no map in time")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    final = json.loads(manifest.read_text())
    assert proc.returncode == 130 and "cancelled" in err.decode()
    assert final["status"] == "cancelled"
    ok = [r for r in final["results"] if r["status"] == "ok"]
    assert 1 <= len(ok) < 3
    for r in ok:  # each finished map is on disk with its recorded checksum
        import hashlib

        assert hashlib.sha256((tmp_path / "out" / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    assert not (tmp_path / "out" / ".esegeta.lock").exists()
