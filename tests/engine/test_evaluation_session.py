"""The one evaluation session: `esegeta run`, `esegeta evaluate RUN_DIR` and the napari Evaluate tab
score a map on the execution it was made with (issue 19.1, issue 15.4), and agree to the last digit."""

from __future__ import annotations

import json
import math
import threading
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.config import ExecutionConfig, PreprocessConfig, parse_config
from esegeta_engine.evaluation.api import evaluation_config
from esegeta_engine.evaluation.session import EvaluationSession, MapScored, execution_from_record
from esegeta_engine.io import load_volume
from esegeta_engine.pipeline import run

AFFINE = np.diag([0.5, 0.5, 0.8, 1.0])
SETTINGS = {"steps": 4, "n_perturb_samples": 4}
SCORED = ("infidelity", "auc_deletion", "auc_insertion", "aopc_deletion")


def _model(tmp_path, dims):
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    model = TinySegNet(dims)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.05]))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    return model


def _sliding_run(tmp_path, dims=3):
    """A finished sliding-window run (patch 6 on a 12-voxel grid) with infidelity and faithfulness."""
    _model(tmp_path, dims)
    shape = (12,) * dims
    vol = np.random.default_rng(0).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "vol.nii.gz")
    cfg = parse_config({
        "model": {"path": "model.pt", "class_path": "tiny_models:TinySegNet", "kwargs": {"dims": dims}},
        "volumes": ["vol.nii.gz"], "target": {"classes": [1]}, "run": {"seed": 3},
        "preprocess": {"spatial_dims": dims},
        "methods": [{"name": "saliency"}, {"name": "integrated_gradients", "params": {"n_steps": 8}}],
        "execution": {"patch_size": 6, "overlap": 0.5},
        "output": {"dir": "out"},
        "evaluation": evaluation_config(infidelity=True, faithfulness=True, **SETTINGS).model_dump(),
    }, base=tmp_path)
    result = run(cfg)
    assert result.status == "completed"
    return cfg, result, json.loads(result.manifest_path.read_text())["results"]


@pytest.mark.parametrize("dims", [2, 3])
def test_evaluate_run_dir_reproduces_the_runs_metrics_on_its_sliding_window(tmp_path, dims) -> None:
    from esegeta_engine.cli import main

    cfg, result, records = _sliding_run(tmp_path, dims)
    assert all(r["execution"]["mode"] == "sliding_window" for r in records)
    before = {r["file"]: dict(r["metrics"]) for r in records}
    for r in records:  # scrub them: `esegeta evaluate` must write them back
        for k in SCORED:
            r["metrics"].pop(k)
    manifest = json.loads(result.manifest_path.read_text())
    manifest["results"] = records
    result.manifest_path.write_text(json.dumps(manifest))
    assert main(["evaluate", str(result.out_dir), "-q"]) == 0
    after = json.loads(result.manifest_path.read_text())
    assert len(after["evaluations"]) == 1
    compared = 0
    for r in after["results"]:
        for k in SCORED:
            assert r["metrics"][k] == pytest.approx(before[r["file"]][k], rel=1e-6, abs=1e-9), (r["file"], k)
            compared += 1
    assert compared == 2 * len(SCORED)


def test_the_plugin_scores_on_the_maps_execution_and_equals_the_cli(tmp_path) -> None:
    """The Evaluate tab's worker gets the map's execution (from the layer metadata) and uses it:
    its numbers equal `esegeta run`'s on a sliding-window run and differ from whole-volume scoring."""
    from napari_esegeta._evaluate import EvalOptions, RowReady, evaluate_groups, map_info
    from tiny_models import TinySegNet

    cfg, result, records = _sliding_run(tmp_path)
    net = TinySegNet(3)
    net.load_state_dict(torch.load(tmp_path / "model.pt"))
    volume = load_volume(tmp_path / "vol.nii.gz", spatial_dims=3)
    options = EvalOptions(evaluation_config(infidelity=True, faithfulness=True, **SETTINGS), seed=3)

    def rows(with_execution: bool, session_execution=None):
        maps = []
        for rec in records:
            data = np.asarray(nib.load(result.out_dir / rec["file"]).dataobj, dtype=np.float32)
            meta = {"esegeta": {"method": rec["method"], "target": "argmax", "class": rec["class"],
                                "target_label": rec["target"], "params": rec["params"], "frozen": True,
                                "execution": rec["execution"] if with_execution else {}}}
            maps.append(map_info(SimpleNamespace(name=rec["file"], metadata=meta, data=data)))
        return [ev.row for ev in evaluate_groups(net, [(volume, maps)], options, preprocess=PreprocessConfig(),
                                                 output=None, execution=session_execution)
                if isinstance(ev, RowReady)]

    recorded = rows(True)  # the layer records its execution
    fallback = rows(False, ExecutionConfig(patch_size=6, overlap=0.5))  # the Model tab's, when not recorded
    whole = rows(False)  # whole volume: another function, other numbers
    for rec, a, b, c in zip(records, recorded, fallback, whole):
        for k in SCORED:
            assert a[k] == pytest.approx(rec["metrics"][k], rel=1e-6, abs=1e-9), (rec["method"], k)
            assert b[k] == pytest.approx(rec["metrics"][k], rel=1e-6, abs=1e-9), (rec["method"], k)
        assert c["infidelity"] != pytest.approx(rec["metrics"]["infidelity"], rel=1e-6)


def test_session_counts_patch_evaluations_of_the_recorded_window(tmp_path) -> None:
    """Scoring a sliding-window map runs the network patch by patch (counted), not on the whole volume."""
    from esegeta_engine.config import TargetConfig
    from esegeta_engine.evaluation.session import MapToScore
    from tiny_models import TinySegNet

    cfg, result, records = _sliding_run(tmp_path)
    net = TinySegNet(3)
    net.load_state_dict(torch.load(tmp_path / "model.pt"))
    shapes: list[tuple[int, ...]] = []
    net.conv1.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape[2:])))
    rec = records[0]
    data = np.asarray(nib.load(result.out_dir / rec["file"]).dataobj, dtype=np.float32)
    info = MapToScore(name="m", method=rec["method"], params=rec["params"], cls=1,
                      target=TargetConfig(classes=[1]), array=data, target_label=rec["target"],
                      execution=rec["execution"])
    session = EvaluationSession(net, evaluation_config(axioms=False, infidelity=True, n_perturb_samples=2), seed=3)
    scored = [e for e in session.score(load_volume(tmp_path / "vol.nii.gz"), [info]) if isinstance(e, MapScored)]
    assert scored and math.isfinite(scored[0].metrics["infidelity"])
    assert scored[0].execution["mode"] == "sliding_window" and scored[0].execution["patch_size"] == [6, 6, 6]
    assert shapes and set(shapes) == {(6, 6, 6)}  # every forward pass saw one patch, never the 12³ volume


def test_execution_from_record_round_trips() -> None:
    from esegeta_engine.forward.runner import execution_form

    cfg = ExecutionConfig(patch_size=[8, 8, 4], overlap=0.5, blend="constant", precision="bf16")
    described = execution_form(cfg, (16, 16, 16), 1).describe()
    again = execution_form(execution_from_record(described), (16, 16, 16), 1).describe()
    assert again == described
    assert execution_from_record({}) is None
    assert execution_from_record({**described, "precision_fallback": "bf16 -> fp32"}).precision == "fp32"


def test_evaluate_refuses_a_folder_without_a_manifest(tmp_path, capsys) -> None:
    from esegeta_engine.cli import main

    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no readable run manifest" in err and "fix:" in err and "Traceback" not in err


def test_cancel_keeps_scored_maps_and_raises_after_them(tmp_path) -> None:
    from esegeta_engine.errors import Cancelled

    cfg, result, records = _sliding_run(tmp_path)
    from esegeta_engine.evaluation.rerun import iter_evaluate_run

    cancel = threading.Event()
    gen = iter_evaluate_run(result.out_dir, metrics=["infidelity"], cancel=cancel)
    first = next(e for e in gen if isinstance(e, MapScored))
    cancel.set()
    with pytest.raises(Cancelled):
        for _ in gen:
            pass
    kept = json.loads(result.manifest_path.read_text())["results"]
    assert kept[first.index]["metrics"]["infidelity"] is not None
