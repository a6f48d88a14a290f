"""Fault matrix, group 5 (issue 10): each case gives one line with the problem and the fix, never a
traceback, and a run that ends on an error never leaves its manifest saying ``running``."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from esegeta_engine.cli import main
from matrix_setup import make_case, one_error_line, raw_nifti


@pytest.fixture
def case(tmp_path):
    return make_case(tmp_path)


def explain(case: Path, *extra: str, volume: str = "vol.nii.gz", model: str = "model.pt") -> list[str]:
    args = ["explain", "--model", str(case / model), "--volume", str(case / volume), "--classes", "1",
            "--method", "saliency", "-q"]
    if model == "model.pt":
        args += ["--class-path", "tiny_models:TinySegNet", "--kwargs", '{"dims": 3}']
    return [*args, *extra]


def test_g5_output_folder_under_a_file(case, capsys):
    (case / "afile").write_text("x")
    assert main(explain(case, "--out", str(case / "afile" / "sub"))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "afile" in line
    assert main(explain(case, "--out", str(case / "afile"))) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err)


def test_g5_output_folder_not_writable(case, capsys, monkeypatch):
    # read-only and immutable folders refuse mkdir/open with EACCES/EPERM/EROFS; as root (CI) the
    # permission bits do not stop us, so the refusal is simulated where the OS would give it
    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(explain(case, "--out", str(case / "ro" / "out"))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "read-only" in line.lower() and "you can write to" in line


def test_g5_full_disk_gives_one_line_and_the_manifest_is_not_left_running(case, capsys, monkeypatch):
    import esegeta_engine.io as io

    real = io.tempfile.mkstemp
    calls = {"n": 0}

    def full_after_two(*args, **kwargs):  # the prediction and the first manifest fit, then the disk is full
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(io.tempfile, "mkstemp", full_after_two)
    assert main(explain(case, "--out", str(case / "out"))) == 2
    assert "disk is full" in one_error_line(capsys.readouterr().err)
    manifest = json.loads((case / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "disk is full" in manifest["error"]


def test_g5_singular_affine(case, capsys):
    bad = np.diag([1.0, 1.0, 0.0, 1.0])
    raw_nifti(case / "flat.nii", (8, 10, 6), bad,
              np.random.default_rng(0).random((8, 10, 6)).astype(np.float32).tobytes(order="F"))
    assert main(explain(case, "--out", str(case / "o"), volume="flat.nii")) == 2
    assert "singular" in one_error_line(capsys.readouterr().err)
    assert not (case / "o").exists()


def test_g5_report_on_a_run_with_a_truncated_map(case, capsys):
    assert main(explain(case, "--out", str(case / "out"))) == 0
    capsys.readouterr()
    target = case / "out" / "vol__saliency__argmax-class1.nii.gz"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    assert main(["report", str(case / "out")]) == 0  # the rest of the report is still written
    err = capsys.readouterr().err
    assert "Traceback" not in err and target.name in err and "fix: rerun" in err
    assert "left out" in (case / "out" / "report.html").read_text()


def test_g5_seed_beyond_64_bits_is_refused_up_front(case, capsys):
    assert main(explain(case, "--out", str(case / "o"), "--seed", str(2**64))) == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "Traceback" not in err  # the flag the user gave (run.seed in a config)
    assert not (case / "o").exists()


def test_g5_torchscript_error_keeps_the_real_reason(case, capsys):
    from tiny_models import PickyNet

    torch.jit.script(PickyNet()).save(str(case / "picky.pt"))
    assert main(explain(case, "--out", str(case / "o"), model="picky.pt")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "PickyNet expects 3 input channels" in line and "TorchScript interpreter" not in line


def test_g5_torchscript_failure_inside_a_method_keeps_the_reason():
    from esegeta_engine.errors import error_reason

    try:
        torch.jit.script(_Fails())(torch.zeros(1))
    except Exception as exc:  # torch.jit.Error
        assert error_reason(exc) == "in the TorchScript model: ValueError: scripted failure"
    else:
        pytest.fail("the scripted module did not raise")
    assert error_reason(ValueError("plain\nmore")) == "ValueError: plain"


class _Fails(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("scripted failure")
