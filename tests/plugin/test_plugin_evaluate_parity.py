"""The napari Evaluate panel and `esegeta run` give the same numbers for the same map and
settings (issue 9, part 5): both call the engine's evaluation API with one set of defaults."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.config import PreprocessConfig, parse_config
from esegeta_engine.evaluation.api import default_settings, evaluation_config
from esegeta_engine.io import load_volume
from esegeta_engine.models import load_model
from esegeta_engine.pipeline import run

AFFINE = np.diag([0.5, 0.5, 0.8, 1.0])


def test_panel_defaults_are_the_engines() -> None:
    from napari_esegeta._evaluate import EvalOptions

    opts = EvalOptions()
    assert opts.config == evaluation_config()  # axioms on, the rest off: as `esegeta run`
    assert set(default_settings())  # the flat settings of the API are still listed
    cfg = evaluation_config(infidelity=True, sensitivity=True, faithfulness=True, randomisation=True)
    assert cfg.faithfulness.steps == 20
    assert cfg.infidelity.n_perturb_samples == 16
    assert cfg.randomisation.calibrate and cfg.axioms is not None
    with pytest.raises(TypeError):
        evaluation_config(stepz=3)


def test_panel_and_cli_give_identical_numbers(tmp_path) -> None:
    from napari_esegeta._evaluate import EvalOptions, RowReady, evaluate_events, map_info
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    model = TinySegNet(3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.05]))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    vol = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "vol.nii.gz")
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:6, 2:6, 2:6] = 1
    nib.save(nib.Nifti1Image(gt, AFFINE), tmp_path / "gt.nii.gz")
    settings = {"steps": 4, "n_perturb_samples": 4}
    cfg = parse_config({
        "model": {"path": "model.pt", "class_path": "tiny_models:TinySegNet", "kwargs": {"dims": 3}},
        "volumes": ["vol.nii.gz"], "target": {"classes": [1]}, "run": {"seed": 3},
        "methods": [{"name": "integrated_gradients", "params": {"n_steps": 8}}, {"name": "saliency"}],
        "output": {"dir": "out"},
        "evaluation": {**evaluation_config(infidelity=True, faithfulness=True, **settings).model_dump(),
                       "localisation": {"mask": "gt.nii.gz"}},
    }, base=tmp_path)
    result = run(cfg)
    records = json.loads(result.manifest_path.read_text())["results"]
    net = load_model(tmp_path / "model.pt", class_path="tiny_models:TinySegNet", kwargs={"dims": 3})
    volume = load_volume(tmp_path / "vol.nii.gz", spatial_dims=3)
    maps = []
    for rec in records:
        data = np.asarray(nib.load(result.out_dir / rec["file"]).dataobj, dtype=np.float32)
        meta = {"esegeta": {"method": rec["method"], "label": rec["method"], "target": "argmax",
                            "class": rec["class"], "target_label": rec["target"], "params": rec["params"],
                            "layer": None, "noise_tunnel": None, "frozen": True}}
        maps.append(map_info(SimpleNamespace(name=rec["method"], metadata=meta, data=data)))
    options = EvalOptions(evaluation_config(infidelity=True, faithfulness=True, **settings), localisation=True,
                          seed=3)
    rows = [ev.row for ev in evaluate_events(net, volume, maps, options, preprocess=PreprocessConfig(),
                                            output=None, ground_truth=gt != 0) if isinstance(ev, RowReady)]
    assert len(rows) == 2
    compared = 0
    for rec, row in zip(records, rows):
        assert row["method"] == rec["method"]
        for key, cli in rec["metrics"].items():
            if key in ("axiom_note", "axiom_status", "note") or key.startswith(("F_", "attribution_sum")):
                continue
            panel = row[key]
            if cli is None:
                assert panel is None or math.isnan(panel), key
            else:
                assert panel == pytest.approx(cli, rel=1e-5, abs=1e-9), (rec["method"], key)
                compared += 1
        assert row.get("axiom_status", "none") == rec["metrics"]["axiom_status"]
    assert compared >= 2 * 10  # infidelity, 3 faithfulness, 8 localisation (+ completeness for IG)


def test_explain_in_napari_records_the_completeness_check_in_layer_metadata() -> None:
    """The Explain widget's engine call runs the axiom check; the layer metadata carries it."""
    import threading

    from esegeta_engine.config import MethodConfig, TargetConfig
    from esegeta_engine.explain import MapReady
    from esegeta_engine.io import Volume
    from napari_esegeta._run import explain_events, map_layer_data
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    net = TinySegNet(3).eval()
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.0, 0.05]))
    volume = Volume(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), AFFINE)
    target = TargetConfig(kind="argmax", classes=[1])
    events = list(explain_events(net, volume, [MethodConfig(name="integrated_gradients", params={"n_steps": 64}),
                                               MethodConfig(name="saliency")],
                                 preprocess=PreprocessConfig(), target=target, output=None, roi_mask=None,
                                 cancel=threading.Event()))
    ready = [e for e in events if isinstance(e, MapReady)]
    assert len(ready) == 2
    layer = SimpleNamespace(name="input", metadata={}, scale=(1, 1, 1), translate=(0, 0, 0), rotate=np.eye(3),
                            shear=(0, 0, 0), affine=SimpleNamespace(affine_matrix=np.eye(4)))
    metas = {}
    for ev in ready:
        _, kwargs, _ = map_layer_data(ev, layer, target)
        metas[ev.job.spec.name] = kwargs["metadata"]["esegeta"]["axiom"]
    assert metas["integrated_gradients"]["axiom_status"] == "ok"
    assert metas["integrated_gradients"]["completeness_error"] < 0.05
    assert metas["saliency"]["axiom_status"] == "none"
