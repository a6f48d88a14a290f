"""Flags the config has and the commands lacked: ``explain --target outcome`` and ``predict -q``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.cli import main


def _files(tmp_path):
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    net = TinySegNet(dims=3).eval()
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    data = np.random.default_rng(0).normal(size=(8, 7, 6)).astype(np.float32)
    affine = np.diag([0.9, 1.1, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    with torch.no_grad():
        pred = net(torch.from_numpy(data)[None, None]).argmax(1)[0].numpy()
    gt = np.zeros_like(pred)
    gt[:4] = 1  # the truth's class 1 on one half: the prediction's class 1 elsewhere is a false positive
    nib.save(nib.Nifti1Image(gt.astype(np.uint8), affine), tmp_path / "gt.nii.gz")
    return net, data, pred, gt


def test_explain_target_outcome_explains_the_false_positives(tmp_path, capsys) -> None:
    net, data, pred, gt = _files(tmp_path)
    fp = (pred == 1) & (gt != 1)
    assert fp.any() and (pred == 1).sum() > fp.sum()  # the region is neither empty nor all of class 1
    assert main(["explain", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "v.nii.gz"),
                 "--target", "outcome", "--ground-truth", str(tmp_path / "gt.nii.gz"), "--outcome", "fp",
                 "--classes", "1", "--method", "saliency", "--out", str(tmp_path / "out"), "-q"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["target"]["kind"] == "outcome" and manifest["config"]["target"]["outcome"] == "fp"
    rec = next(r for r in manifest["results"] if r["status"] == "ok")
    ours = nib.load(tmp_path / "out" / rec["file"]).get_fdata()
    # independent: autograd of the class-1 logits summed over the false positives
    x = torch.from_numpy(data)[None, None].requires_grad_(True)
    net(x)[0, 1][torch.from_numpy(fp)].sum().backward()
    np.testing.assert_allclose(ours, x.grad[0, 0].abs().numpy(), rtol=1e-5, atol=1e-7)


def test_explain_target_outcome_without_ground_truth_names_the_flag(tmp_path, capsys) -> None:
    _files(tmp_path)
    assert main(["explain", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "v.nii.gz"),
                 "--target", "outcome", "--method", "saliency", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--ground-truth" in err and "target.ground_truth" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_explain_outcome_choices_are_the_configs() -> None:
    from esegeta_engine.cli import build_parser
    from esegeta_engine.config import TargetConfig

    parser = build_parser()
    args = parser.parse_args(["explain", "--volume", "v", "--method", "saliency", "--target", "outcome",
                              "--outcome", "tp"])
    assert args.target == "outcome" and args.outcome == "tp"
    kinds = TargetConfig.model_fields["kind"].annotation.__args__
    explain = parser._subparsers._group_actions[0].choices["explain"]
    target = next(a for a in explain._actions if a.dest == "target")
    assert set(target.choices) == set(kinds)  # every target kind the config has
    with pytest.raises(SystemExit):
        parser.parse_args(["explain", "--volume", "v", "--method", "saliency", "--outcome", "tn"])


@pytest.mark.parametrize("quiet", [False, True])
def test_predict_quiet_prints_no_progress(tmp_path, capsys, quiet) -> None:
    _files(tmp_path)
    argv = ["predict", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "v.nii.gz"),
            "--out", str(tmp_path / "p")]
    assert main(argv + (["-q"] if quiet else [])) == 0
    out, err = capsys.readouterr()
    assert "v__prediction.nii.gz" in out  # what was written is listed either way
    assert (err.strip() == "") == quiet
    assert (tmp_path / "p" / "v__probabilities.nii.gz").is_file()


def test_evaluate_a_bundle_run_with_trust_bundle(tmp_path, capsys) -> None:
    """The refusal told the user to pass --trust-bundle, which ``esegeta evaluate`` did not have."""
    import bundle_setup as B

    root = B.write_bundle(tmp_path / "tiny_bundle")
    scan = B.oblique_scan(tmp_path / "scan.nii.gz")
    assert main(["explain", "--bundle", str(root), "--trust-bundle", "--volume", str(scan), "--classes", "1",
                 "--method", "saliency", "--out", str(tmp_path / "out"), "-q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "out"), "--metrics", "axioms", "-q"]) == 2  # not trusted: refused
    err = capsys.readouterr().err
    assert "--trust-bundle" in err and "Traceback" not in err
    assert main(["evaluate", str(tmp_path / "out"), "--metrics", "axioms", "--trust-bundle", "-q"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["evaluations"]) == 1 and manifest["evaluations"][0]["maps"] == 1


def _closed_pipe_exit(tmp_path, monkeypatch, argv: list[str]) -> int:
    """``main(argv)`` with stdout a pipe whose reader has exited; its exit code."""
    import os
    import sys

    fd = os.open(tmp_path / "sink", os.O_WRONLY | os.O_CREAT)

    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return fd

    monkeypatch.setattr(sys, "stdout", Gone())
    try:
        return main(argv)
    finally:
        monkeypatch.undo()
        os.close(fd)


def test_layers_into_a_closed_pipe_is_no_error(tmp_path, capsys, monkeypatch) -> None:
    """``esegeta layers MODEL | head`` said "error: cannot write a file: Broken pipe; fix: choose another
    output folder"."""
    _files(tmp_path)
    assert _closed_pipe_exit(tmp_path, monkeypatch, ["layers", str(tmp_path / "net.pt")]) == 0
    assert "error" not in capsys.readouterr().err


def test_predict_into_a_closed_pipe_is_no_success(tmp_path, capsys, monkeypatch) -> None:
    """A command that does work and is stopped by the closed pipe before it finished (``predict`` before its
    ``prediction.json``) must not exit 0: a script checking ``$?`` would take it for done."""
    _files(tmp_path)
    argv = ["predict", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "v.nii.gz"),
            "--out", str(tmp_path / "pred"), "-q"]
    assert _closed_pipe_exit(tmp_path, monkeypatch, argv) == 1
    assert "pipe closed before the command finished" in capsys.readouterr().err
    assert not (tmp_path / "pred" / "prediction.json").exists()


def test_layers_names_stay_in_one_column(tmp_path, capsys) -> None:
    from torch import nn

    net = nn.Sequential()  # names longer than the old fixed 40-character column (an nnU-Net's are)
    net.add_module("decoder_of_a_network_with_a_rather_long_name", nn.Sequential(nn.Conv3d(1, 2, 1), nn.ReLU()))
    torch.jit.script(net).save(str(tmp_path / "long.pt"))
    assert main(["layers", str(tmp_path / "long.pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    starts = {len(line) - len(line.rstrip().split()[-1]) for line in lines}
    assert len(lines) == 3 and len(starts) == 1  # every type name starts at one column


def test_every_flag_of_every_command_says_what_it_does() -> None:
    import argparse

    from esegeta_engine.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in sub.choices.items()
            for a in p._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert bare == []


def test_a_key_followed_by_its_flag_is_said_once(tmp_path, capsys) -> None:
    from esegeta_engine.cli import in_flags

    assert in_flags("choose a folder for output.dir (--out)", frozenset({"--out"})) == "choose a folder for --out"
    _files(tmp_path)
    (tmp_path / "afile").write_text("")
    assert main(["explain", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "v.nii.gz"),
                 "--method", "saliency", "--out", str(tmp_path / "afile"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "--out (--out)" not in err and "output.dir" not in err


def test_predict_takes_explains_orientation_and_window_flags(tmp_path, capsys) -> None:
    """What predict writes must be what explain explains: the same reorientation; bad values are one line."""
    net, _, _, _ = _files(tmp_path)
    data = np.random.default_rng(1).normal(size=(8, 7, 6)).astype(np.float32)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # stored as L, P, S
    nib.save(nib.Nifti1Image(data, lps), tmp_path / "lps.nii.gz")
    assert main(["predict", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "lps.nii.gz"),
                 "--orientation", "RAS", "--out", str(tmp_path / "p"), "-q"]) == 0
    probs = nib.load(tmp_path / "p" / "lps__probabilities.nii.gz")
    assert np.allclose(probs.affine, lps)  # written on the scan's own grid
    ras = np.ascontiguousarray(data[::-1, ::-1])  # the network sees the scan in RAS
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(ras)[None, None]), 1)[0].numpy()[:, ::-1, ::-1]
    np.testing.assert_allclose(np.moveaxis(probs.get_fdata(), -1, 0), expected, atol=1e-6)
    with torch.no_grad():  # the control: without the reorientation the network's output differs
        plain = torch.softmax(net(torch.from_numpy(data)[None, None]), 1)[0].numpy()
    assert np.abs(plain - expected).max() > 1e-3
    for bad in (["--axis-order", "abc"], ["--overlap", "1.5"], ["--orientation", "QQQ"]):
        assert main(["predict", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "lps.nii.gz"),
                     "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert bad[0] in err and "Traceback" not in err and "pydantic" not in err
    assert not (tmp_path / "bad").exists()
    # a rule over two flags names both flags, and predict's fix is its own help (it has no methods)
    assert main(["predict", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "lps.nii.gz"),
                 "--axis-order", "xy", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "--axis-order 'xy' has 2 axes but --spatial-dims is 3" in err and "esegeta predict --help" in err
    assert "esegeta methods" not in err
    # one patch size for every axis, as explain takes it (it was refused, asking for that very form)
    assert main(["predict", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "lps.nii.gz"),
                 "--patch-size", "4", "--out", str(tmp_path / "one"), "-q"]) == 0


@pytest.mark.parametrize("target, flag", [("voxel", "--voxel [x, y, z]"), ("channel", "--target-layer <module name>"),
                                          ("roi", "--roi-mask (a NIfTI")])
def test_a_target_missing_its_input_names_the_flag(tmp_path, capsys, target, flag) -> None:
    _files(tmp_path)
    assert main(["explain", "--model", str(tmp_path / "net.pt"), "--volume", str(tmp_path / "v.nii.gz"),
                 "--target", target, "--method", "saliency", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert flag in err and "(top level)" not in err and "target.voxel" not in err and "target.layer" not in err


def test_the_summary_legend_explains_only_the_columns_shown() -> None:
    from esegeta_engine.cli_summary import _legend

    assert _legend([]) == "calls/inputs: model forward calls and inputs evaluated"
    shown = _legend(["completeness_error"])
    assert shown.startswith("completeness_error:") and "auc" not in shown and "roc_auc" not in shown
    full = _legend(["completeness_error", "auc_deletion", "mass_inside", "roc_auc"])
    assert "auc_deletion lower is better" in full and "mass_inside, roc_auc (vs the ground truth) higher" in full
    assert "auc_insertion" not in full
    from esegeta_engine.cli_summary import SUMMARY_METRICS

    every = _legend(list(SUMMARY_METRICS))  # every column the table can show is explained
    assert all(k in every for k in SUMMARY_METRICS)
    assert "infidelity, sensitivity, auc_deletion lower is better" in every
