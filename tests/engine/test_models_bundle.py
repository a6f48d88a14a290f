"""MONAI bundles explained through their own pipeline (preprocessing, inferer, Invertd).

The reference is MONAI itself: the bundle's config parsed by ``ConfigParser`` and run as
its evaluator would (``monai_reference``), on an oblique, flipped, anisotropic scan; for
gradients, plain autograd through MONAI's ``sliding_window_inference``.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

import bundle_setup as B
from esegeta_engine.cli import main
from esegeta_engine.config import ModelConfig, parse_config
from esegeta_engine.models import Trust, get_layer, load_source
from esegeta_engine.pipeline import run


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return B.write_bundle(tmp_path_factory.mktemp("bundle") / "tiny_bundle")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return B.oblique_scan(tmp_path_factory.mktemp("scan") / "scan.nii.gz")


def _input(scan):
    img = nib.load(scan)
    return img, torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]


def _loaded(bundle, scan):
    loaded = load_source(ModelConfig(bundle=bundle), Trust(bundle=True))
    loaded.module.bind_volume(nib.load(scan).affine)
    return loaded


def test_probabilities_equal_the_bundles_own_pipeline_on_an_oblique_flipped_scan(bundle, scan):
    img, x = _input(scan)
    loaded = _loaded(bundle, scan)
    with torch.no_grad():
        ours = loaded.module(x)[0].numpy()
    ref = B.monai_reference(bundle, scan)
    assert ours.shape == ref.shape == (3, *img.shape)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_allclose(ours.sum(0), 1.0, atol=1e-5)  # softmax ran, on the scan's grid
    assert loaded.class_names == B.CLASSES and loaded.outputs == "probabilities"
    ex = loaded.module.describe_execution()
    assert ex["inferer"] == "SlidingWindowInferer" and ex["patch_size"] == [16, 16, 16] and ex["overlap"] == 0.5
    assert ex["patches_per_evaluation"] > 1 and ex["inversion"] == "Invertd"
    assert ex["preprocessing"] == ["Orientationd", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    assert loaded.description["skipped"][0].startswith("LoadImaged")


def test_gradient_equals_autograd_through_monais_sliding_window_inference(bundle, scan):
    from monai.inferers import sliding_window_inference

    _, x = _input(scan)
    m = _loaded(bundle, scan).module
    calls = []
    m.bind_monitor(calls.append)
    xa = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m(xa)[0, 1].sum(), xa)
    patches = m.describe_execution()["patches_per_evaluation"]
    assert sum(calls) == 2 * patches  # the forward and the patch-by-patch recomputation in the backward
    m.__dict__["window"] = None  # the same pipeline with MONAI's inferer, one whole graph
    m._infer = lambda b: sliding_window_inference(b.float(), (16, 16, 16), 2, m.network, overlap=0.5,
                                                  mode="gaussian")
    xb = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(m(xb)[0, 1].sum(), xb)
    assert g.abs().max() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6 * float(g_ref.abs().max()))


def test_methods_through_the_bundle_pipeline_give_maps_on_the_scans_affine(bundle, scan, tmp_path):
    img, x = _input(scan)
    cfg = parse_config({
        "model": {"bundle": str(bundle)}, "volumes": [str(scan)], "target": {"classes": [1]},
        "methods": [{"name": "saliency"}, {"name": "layer_gradient_x_activation", "layers": ["network_input"]}],
        "output": {"dir": str(tmp_path / "out"), "probabilities": True}}, base=tmp_path)
    result = run(cfg, trust_bundle=True)
    assert result.status == "completed" and not result.failed
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["model"]["source"] == "bundle" and manifest["model"]["class_names"] == B.CLASSES
    assert manifest["model"]["attribution_grid"] == "scan"
    assert {r["method"] for r in manifest["results"]} == {"saliency", "layer_gradient_x_activation"}
    for rec in manifest["results"]:
        out = nib.load(tmp_path / "out" / rec["file"])
        assert out.shape == img.shape and np.allclose(out.affine, img.affine)
        assert np.isfinite(out.get_fdata()).all() and np.abs(out.get_fdata()).max() > 0
        assert rec["execution"]["pipeline"] == "bundle" and rec["execution"]["attribution_grid"].startswith("scan")
        assert "network grid" in rec["execution"]["layer_grid"]
        ex = rec["execution"]  # the plan's patch count of the method's forward calls is what ran
        assert rec["expected_network_evaluations"] == ex["forward_network_calls"] == ex["patches_per_evaluation"]
        assert ex["backward_network_calls"] == ex["forward_network_calls"]  # recomputed patch by patch
    probs = nib.load(tmp_path / "out" / "scan__probabilities.nii.gz")
    assert probs.shape == (*img.shape, 3) and np.allclose(probs.affine, img.affine)
    np.testing.assert_allclose(np.moveaxis(probs.get_fdata(), -1, 0), B.monai_reference(bundle, scan), atol=1e-4)


def test_layers_inside_the_network_resolve_and_methods_not_built_there_are_refused(bundle, scan):
    m = _loaded(bundle, scan).module
    assert m.runs_layer_per_member(get_layer(m, "network.conv_0"))  # per patch (test_models_member_layer.py)
    why = m.layer_method_refusal("layer_deeplift", "network.conv_0")
    assert why is not None and "inside the bundle's network" in why[0] and "layer_gradcam" in why[1]
    assert m.layer_method_refusal("layer_gradient_x_activation", "network.conv_0") is None
    assert get_layer(m, "network_input") is m.network_input


def _cli(root, scan, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["explain", "--bundle", str(root), "--trust-bundle", "--volume", str(scan), "--method", "saliency",
               "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "fix:" in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("damage, message", [
    (lambda r: None, "has no 'network_def'"),
    (lambda r: (r / "models" / "model.pt").unlink(), "models/model.pt does not exist"),
    (lambda r: torch.save({"conv.weight": torch.zeros(1)}, r / "models" / "model.pt"),
     "do not fit network_def"),
])
def test_bundle_without_network_def_or_fitting_weights_is_one_line(scan, tmp_path, capsys, damage, message):
    cfg = B.config(network_def=None) if "network_def'" in message else B.CONFIG
    root = B.write_bundle(tmp_path / "b", cfg)
    damage(root)
    assert message in _cli(root, scan, tmp_path, capsys)


@pytest.mark.parametrize("transform, message", [
    ({"_target_": "HistogramNormalized", "keys": "image"},
     "HistogramNormalized of the bundle's preprocessing cannot be explained through"),
    ({"_target_": "RandGaussianNoised", "keys": "image", "prob": 1.0}, "random transform RandGaussianNoised"),
])
def test_transforms_we_cannot_differentiate_are_refused_by_name(scan, tmp_path, capsys, transform, message):
    cfg = B.config()
    cfg["preprocessing"]["transforms"].insert(4, transform)
    root = B.write_bundle(tmp_path / "b", cfg)
    err = _cli(root, scan, tmp_path, capsys)
    assert message in err and f"remove {transform['_target_']}" in err


def test_an_inferer_we_do_not_run_is_refused_by_name(scan, tmp_path, capsys):
    cfg = B.config(inferer={"_target_": "SlidingWindowInfererAdapt", "roi_size": [16, 16, 16]})
    root = B.write_bundle(tmp_path / "b", cfg)
    assert "inferer SlidingWindowInfererAdapt is not one we run" in _cli(root, scan, tmp_path, capsys)


def test_an_ensemble_bundle_is_refused_by_name(scan, tmp_path, capsys):
    post = B.config()["postprocessing"]
    post["transforms"].insert(0, {"_target_": "MeanEnsembled", "keys": ["pred"], "output_key": "pred"})
    root = B.write_bundle(tmp_path / "b", B.config(postprocessing=post))
    assert "defines an ensemble (MeanEnsembled)" in _cli(root, scan, tmp_path, capsys)


def test_a_bundle_has_no_fold_or_mirror_members_and_stability_says_so(bundle, scan):
    from esegeta_engine.errors import MethodError
    from esegeta_engine.evaluation.stability import choose_members

    m = _loaded(bundle, scan).module
    assert m.members("folds") == [] and m.members("mirrors") == []
    for over in ("folds", "mirrors"):
        with pytest.raises(MethodError, match="0 .* member\\(s\\), not several \\(a MONAI bundle runs its one "
                                              "network_def with no test-time augmentation") as info:
            choose_members(m, over)
        problem, fix = str(info.value).splitlines()  # one line for the problem, one for the fix
        assert "stability.over: noise" in fix
    assert choose_members(m, "auto") == ("noise", None)  # the documented fallback
