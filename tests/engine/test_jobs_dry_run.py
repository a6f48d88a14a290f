"""`esegeta run --dry-run` on a single run: the plan, the refusals and one probed patch, nothing written."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import tiny_models
from esegeta_engine.cli import main


@pytest.fixture
def config(tmp_path):
    torch.manual_seed(0)
    torch.save(tiny_models.TinySegNet(3).state_dict(), tmp_path / "model.pt")
    data = np.random.default_rng(0).random((20, 18, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.0, 2.0, 1.0])), tmp_path / "vol.nii.gz")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": "model.pt", "class_path": "tiny_models:TinySegNet", "kwargs": {"dims": 3}},
        "volumes": ["vol.nii.gz"], "target": {"kind": "argmax", "classes": [0, 1]},
        "methods": [{"name": "saliency"}, {"name": "integrated_gradients", "params": {"n_steps": 4}},
                    {"name": "feature_permutation"}],
        "execution": {"mode": "sliding_window", "patch_size": [8, 8, 8]},
        "evaluation": {"faithfulness": {"steps": 4}},
        "output": {"dir": "out"}}))
    return path


def _count_forwards(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    forward = tiny_models.TinySegNet.forward

    def counted(self, x):
        calls.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(tiny_models.TinySegNet, "forward", counted)
    return calls


def test_dry_run_plans_refuses_and_probes_one_patch_writing_nothing(config, monkeypatch, capsys):
    calls = _count_forwards(monkeypatch)
    assert main(["run", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # the probe's calls only (a warm-up, a timed forward + backward and a timed forward without gradients
    # of one 8³ patch; a backward is no network call): no prediction pass, no method (the next test
    # checks them against the probe alone)
    assert calls == [(1, 1, 8, 8, 8)] * 3
    assert not (config.parent / "out").exists()
    # 2 methods × 2 classes: saliency 1 and IG 4 evaluations a class
    assert "plan: 4 job(s), ≈ 10 model evaluations (scores included)" in out
    assert "vol · integrated_gradients · argmax-class1: 4 model evaluations" in out
    refused = [line for line in out.splitlines() if "feature_permutation" in line]
    assert len(refused) == 1 and "sliding-window" in refused[0]  # named with its one-line reason
    assert "probe of vol: ≈" in out and "one 8×8×8 patch" in out and "estimate for the whole run: ≈" in out
    assert "dry run: nothing written" in out
    # the run itself counts what the dry run planned for the methods that run (its own estimate also
    # counts the refused method's, which fails by name at no evaluation)
    monkeypatch.undo()
    assert main(["run", str(config), "-q"]) == 1
    manifest = json.loads((config.parent / "out" / "manifest.json").read_text())
    assert manifest["model_evaluations"] == 10
    assert sorted(r["status"] for r in manifest["results"]) == ["failed", "failed", "ok", "ok", "ok", "ok"]


def test_dry_run_costs_the_same_network_calls_as_the_probe_alone(config, monkeypatch, capsys):
    from esegeta_engine.config import MethodConfig, parse_config
    from esegeta_engine.explain import Explainer
    from esegeta_engine.inputs import load_inputs
    from esegeta_engine.jobs.probe import probe_run
    from esegeta_engine.models import load_source

    cfg = parse_config(yaml.safe_load(config.read_text()), base=config.parent)
    model = load_source(cfg.model).module
    ex = Explainer(model, cfg.preprocess, cfg.target, execution=cfg.execution)
    (volume,), _ = load_inputs(cfg)
    calls = _count_forwards(monkeypatch)
    probe_run(ex, volume, [MethodConfig(name="saliency")])
    alone = list(calls)
    calls.clear()
    assert main(["run", str(config), "--dry-run"]) == 0
    assert calls == alone and len(alone) == 3


def test_dry_run_reads_each_whole_volume_off_the_probe_line(config):
    """Whole-volume execution: each volume's prediction pass and evaluations come from the probe's line through
    two crop sizes at that volume's voxel count (not in proportion to the probed volume's)."""
    from esegeta_engine.config import parse_config
    from esegeta_engine.jobs.dry_run import dry_run

    raw = yaml.safe_load(config.read_text())
    data = np.random.default_rng(1).random((80, 18, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), config.parent / "big.nii.gz")
    raw.update(volumes=["vol.nii.gz", "big.nii.gz"], methods=[{"name": "saliency"}])
    raw.pop("execution")
    raw.pop("evaluation")
    plan = dry_run(parse_config(raw, base=config.parent))
    probe = plan.probe
    assert plan.probe_volume == "big" and probe.network_calls == 6 and probe.probed == 2  # 3 a size
    line, plain = probe.evaluation_line, probe.prediction_line
    per_volume = [plain.at(v) + 2 * line.at(v) for v in (20 * 18 * 8, 80 * 18 * 8)]  # 2 classes: 2 evaluations
    assert plan.expected_evaluations == 4
    assert plan.seconds == pytest.approx(sum(per_volume))
