"""Planned runs: job keys and names, costs known before a run, resume after SIGKILL, the global
RNG untouched, reorientation with flipped/oblique affines, padding for U-Nets that need it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig, parse_config
from esegeta_engine.jobs.resume import file_sha256
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.io import Volume
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods.registry import CostInfo
from esegeta_engine.pipeline import run
from esegeta_engine.forward.scoring import EvaluationMonitor, ScoreModel
from esegeta_engine.targets import ClassificationTarget

from tiny_models import TinyClassifier, TinySegNet


def _model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "seg.pt"
    torch.jit.script(TinySegNet(3).eval()).save(str(path))
    return path


def _volume_file(tmp_path: Path, shape=(12, 10, 8), affine=None, name="vol.nii.gz") -> Path:
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


COST_CASES = [
    ("saliency", {}, None), ("input_x_gradient", {}, None), ("integrated_gradients", {}, None),
    ("integrated_gradients", {"n_steps": 10, "internal_batch_size": 3}, None),
    ("integrated_gradients", {"n_steps": 6}, {"type": "smoothgrad", "samples": 4}),
    ("saliency", {}, {"type": "vargrad", "samples": 3}), ("gradient_shap", {}, None),
    ("occlusion", {"window": 4}, None), ("occlusion", {"window": [4, 3], "stride": 2}, None),
    ("feature_ablation", {"mask": "grid", "grid_size": 4}, None),
    ("shapley_value_sampling", {"mask": "grid", "grid_size": 5, "n_samples": 3}, None),
    ("kernel_shap", {"mask": "grid", "grid_size": 4, "n_samples": 20}, None),
    ("lime", {"mask": "grid", "grid_size": 4, "n_samples": 10, "perturbations_per_eval": 3}, None),
]


@pytest.mark.parametrize("name,params,nt", COST_CASES)
def test_expected_evaluations_equal_the_counted_ones(name, params, nt):
    torch.manual_seed(0)
    net = TinyClassifier(2).eval()
    x = torch.randn(1, 1, 12, 10)
    monitor = EvaluationMonitor()
    spec = get_method(name)
    p = spec.resolve_params(params)
    attribute(spec, MethodContext(ScoreModel(net, ClassificationTarget(), None, monitor), x, 0), p, nt)
    info = CostInfo(1, 1, (12, 10), int(nt["samples"]) if nt else 1)
    assert spec.cost is not None
    assert spec.cost(info, p) == monitor.count


def _cfg(tmp_path: Path, methods: list[dict], out: str = "out", **extra) -> object:
    data = {"model": {"path": str(_model_file(tmp_path))}, "volumes": [str(_volume_file(tmp_path))],
            "target": {"classes": [1]}, "methods": methods, "output": {"dir": str(tmp_path / out)},
            **extra}
    return parse_config(data)


def test_same_method_with_other_parameters_gets_its_own_file(tmp_path):
    cfg = _cfg(tmp_path, [{"name": "integrated_gradients", "params": {"n_steps": 4}},
                          {"name": "integrated_gradients", "params": {"n_steps": 8}}])
    result = run(cfg)
    files = [r["file"] for r in result.records]
    assert len(files) == 2 and len(set(files)) == 2
    assert all((tmp_path / "out" / f).is_file() for f in files)
    keys = [r["key"] for r in result.records]
    assert len(set(keys)) == 2
    a, b = (nib.load(str(tmp_path / "out" / f)).get_fdata() for f in files)
    assert not np.array_equal(a, b)


def test_progress_total_equals_the_evaluations_made(tmp_path):
    cfg = _cfg(tmp_path, [{"name": "saliency"}, {"name": "integrated_gradients", "params": {"n_steps": 12}},
                          {"name": "occlusion", "params": {"window": 4}}])
    seen = []
    result = run(cfg, on_event=lambda e: seen.append(e))
    progress = [e for e in seen if hasattr(e, "run_expected")]
    expected = progress[0].run_expected
    made = sum(r["model_evaluations"] for r in result.records)
    assert expected == made == sum(r["expected_evaluations"] for r in result.records)
    assert progress[-1].run_evaluations == made


def test_global_rng_state_is_untouched(tmp_path):
    cfg = _cfg(tmp_path, [{"name": "gradient_shap"}, {"name": "kernel_shap",
                                                       "params": {"mask": "grid", "grid_size": 4}}])
    torch.manual_seed(123)
    np.random.seed(7)
    before_t, before_n = torch.get_rng_state().clone(), np.random.get_state()[1].copy()
    run(cfg)
    assert torch.equal(torch.get_rng_state(), before_t)
    assert np.array_equal(np.random.get_state()[1], before_n)


def test_resume_after_sigkill_redoes_only_the_unfinished_job(tmp_path):
    import yaml

    config = {"model": {"path": str(_model_file(tmp_path))}, "volumes": [str(_volume_file(tmp_path))],
              "target": {"classes": [1]},
              "methods": [{"name": "saliency"}, {"name": "input_x_gradient"},
                          # slow: one evaluation per voxel-sized window
                          {"name": "occlusion", "params": {"window": 1, "perturbations_per_eval": 1}}],
              "output": {"dir": str(tmp_path / "out")}, "run": {"timeout_s": None}}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "esegeta_engine.cli", "run", str(cfg_path), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = tmp_path / "out" / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if len(json.loads(manifest.read_text())["results"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the run did not write two results in time")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = json.loads(manifest.read_text())["results"]
    assert [r["method"] for r in first] == ["saliency", "input_x_gradient"]
    hashes = {r["file"]: file_sha256(tmp_path / "out" / r["file"]) for r in first}
    mtimes = {f: (tmp_path / "out" / f).stat().st_mtime_ns for f in hashes}
    assert not list((tmp_path / "out").glob("*occlusion*.nii.gz"))
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(manifest.read_text())["results"]
    assert [r["method"] for r in results] == ["saliency", "input_x_gradient", "occlusion"]
    assert [bool(r.get("resumed")) for r in results] == [True, True, False]
    for f, h in hashes.items():  # byte-identical and not rewritten
        assert file_sha256(tmp_path / "out" / f) == h
        assert (tmp_path / "out" / f).stat().st_mtime_ns == mtimes[f]


def test_resume_with_a_changed_parameter_redoes_only_that_job(tmp_path):
    cfg = _cfg(tmp_path, [{"name": "saliency"}, {"name": "integrated_gradients", "params": {"n_steps": 4}}])
    run(cfg)
    cfg2 = _cfg(tmp_path, [{"name": "saliency"}, {"name": "integrated_gradients", "params": {"n_steps": 6}}])
    result = run(cfg2, resume=True)
    assert [bool(r.get("resumed")) for r in result.records] == [True, False]
    assert result.records[1]["params"]["n_steps"] == 6


def test_resume_refuses_a_folder_of_another_model(tmp_path):
    from esegeta_engine.errors import ConfigError

    cfg = _cfg(tmp_path, [{"name": "saliency"}])
    run(cfg)
    torch.manual_seed(99)
    torch.jit.script(TinySegNet(3).eval()).save(str(tmp_path / "other.pt"))
    cfg.model.path = tmp_path / "other.pt"
    with pytest.raises(ConfigError, match="another model"):
        run(cfg, resume=True)


def _oblique_flipped_affine() -> np.ndarray:
    rot = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])  # permuted and flipped
    c, s = np.cos(0.2), np.sin(0.2)
    tilt = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])  # oblique by ~11 degrees
    aff = np.eye(4)
    aff[:3, :3] = tilt @ rot @ np.diag([0.8, 0.9, 1.2])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    return aff


def test_orientation_reorients_with_flips_and_maps_come_back_to_the_scan_grid(tmp_path):
    affine = _oblique_flipped_affine()
    data = np.random.default_rng(2).normal(size=(9, 10, 11)).astype(np.float32)
    vol = Volume(data, affine, None)
    # a model that is not equivariant to flips/permutations: weights differ per axis
    net = nn.Conv3d(1, 2, (3, 1, 1), padding=(1, 0, 0))
    expl = Explainer(net, PreprocessConfig(orientation="RAS"), TargetConfig(kind="voxel", voxel=[2, 3, 4],
                                                                            classes=[1]))
    x = expl.prepare_input(vol)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    assert np.array_equal(x[0, 0].numpy(), np.asarray(canonical.dataobj))  # independent: nibabel's RAS
    maps = [e for e in expl.iter_explain([vol], [MethodConfig(name="saliency")], threaded=False)
            if isinstance(e, MapReady)]
    arr = maps[0].array
    assert arr.shape == data.shape
    # saliency of a voxel target through a (3,1,1) kernel along RAS-x: non-zero at the voxel itself and
    # its neighbours along the scan axis that RAS-x maps to, nowhere else
    ras_x_axis = int(np.argmax(np.abs(affine[:3, :3])[0]))
    nz = np.argwhere(arr != 0)
    assert [2, 3, 4] in nz.tolist()
    others = [a for a in range(3) if a != ras_x_axis]
    assert all(r[others[0]] == [2, 3, 4][others[0]] and r[others[1]] == [2, 3, 4][others[1]] for r in nz)


@pytest.mark.parametrize("net_name", ["BasicUNet", "UNet", "SegResNet"])
def test_monai_networks_take_odd_sizes_through_padding(net_name):
    from monai.networks import nets

    torch.manual_seed(0)
    if net_name == "BasicUNet":
        net = nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4))
    elif net_name == "UNet":
        net = nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2))
    else:
        net = nets.SegResNet(3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1),
                             blocks_up=(1, 1))
    vol = Volume(np.random.default_rng(3).normal(size=(33, 40, 37)).astype(np.float32), np.eye(4), None)
    expl = Explainer(net.eval(), target=TargetConfig(classes=[1]))
    maps = [e for e in expl.iter_explain([vol], [MethodConfig(name="saliency")], threaded=False)
            if isinstance(e, MapReady)]
    assert maps and maps[0].array.shape == (33, 40, 37) and np.isfinite(maps[0].array).all()
    assert float(np.abs(maps[0].array).max()) > 0


def test_two_runs_in_one_process_keep_their_own_logs(tmp_path):
    """No log handler shared between runs: each run's esegeta.log holds its own lines only."""
    import threading

    cfgs = [_cfg(tmp_path, [{"name": "saliency"}, {"name": "integrated_gradients", "params": {"n_steps": 4}}],
                 out=f"out{i}") for i in range(2)]
    gens = [__import__("esegeta_engine.pipeline", fromlist=["iter_run"]).iter_run(c, threaded=True) for c in cfgs]
    errors = []

    def drain(gen):
        try:
            for _ in gen:
                time.sleep(0.001)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(g,)) for g in gens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for i in range(2):
        text = (tmp_path / f"out{i}" / "esegeta.log").read_text()
        other = str(tmp_path / f"out{1 - i}" / "manifest.json")
        assert "saliency" in text and other not in text
        assert text.count("run completed") == 1
