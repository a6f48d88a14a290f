"""nnU-Net v2 folders explained as deployed: a model built with nnU-Net's own tools.

The reference is nnU-Net itself: ``nnUNetPredictor.predict_single_npy_array`` for the
probabilities, nnU-Net's resampling functions for the resampling, plain autograd through
the un-chunked ensemble for the patch-wise gradients.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

import nnunet_setup as S  # noqa: E402

from esegeta_engine.cli import main  # noqa: E402
from esegeta_engine.config import ModelConfig, parse_config  # noqa: E402
from esegeta_engine.errors import ModelLoadError, PickledModuleError  # noqa: E402
from esegeta_engine.models import Trust, get_layer, load_source  # noqa: E402
from esegeta_engine.models.nnunet.resample import resampler  # noqa: E402
from esegeta_engine.pipeline import run  # noqa: E402

SCAN_SPACING = (0.9, 1.1, 2.5)  # differs from the plans' (1, 1, 2)


@pytest.fixture(scope="module")
def folder(nnunet_folder) -> Path:
    return nnunet_folder  # built once per session (tests/conftest.py)


@pytest.fixture(scope="module")
def scan_img(tmp_path_factory):
    img, _ = S.scan((14, 11, 6), SCAN_SPACING, seed=5)
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    nib.save(img, path)
    return img, path


def _ours(folder: Path, img, **model) -> np.ndarray:
    loaded = load_source(ModelConfig(nnunet=folder, **model))
    loaded.module.bind_volume(img.header.get_zooms()[:3])
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    with torch.no_grad():
        return loaded.module(x)[0].numpy()


@pytest.mark.parametrize("order, shapes", [
    (3, ((10, 22, 25), (12, 24, 22), [2.5, 1.1, 0.9], [2.0, 1.0, 1.0])),  # spline order 3, clipped
    (3, ((6, 22, 25), (12, 24, 22), [4.0, 1.1, 0.9], [2.0, 1.0, 1.0])),  # anisotropic: slices apart
    (1, ((12, 24, 22), (6, 22, 25), [2.0, 1.0, 1.0], [4.0, 1.1, 0.9])),  # probabilities back
])
def test_resampling_matrices_equal_nnunet_functions(order, shapes):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    shape, new, cur, tgt = shapes
    fn = partial(resample_data_or_seg_to_shape, is_seg=False, order=order, order_z=0, force_separate_z=None)
    a = np.random.default_rng(0).normal(size=(2, *shape))
    ours = resampler(fn, shape, new, cur, tgt).apply(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(ours, fn(a, new, cur, tgt), atol=1e-10)


@pytest.mark.parametrize("folds", [(0,), (0, 1)])
def test_probabilities_equal_nnunet_predictor(folder, scan_img, folds):
    img, _ = scan_img
    ref = S.reference_probabilities(folder, folds, img, mirroring=True)
    ours = _ours(folder, img, folds=list(folds))
    assert ours.shape == ref.shape == (2, *img.shape)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_patchwise_gradient_equals_plain_autograd_and_counts_every_mirror_and_fold(folder, scan_img):
    from esegeta_engine.models.nnunet import window as W

    img, _ = scan_img
    loaded = load_source(ModelConfig(nnunet=folder, folds=[0, 1]))
    m = loaded.module
    m.bind_volume(img.header.get_zooms()[:3])
    calls = []
    m.bind_monitor(calls.append)
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None].requires_grad_(True)
    (g,) = torch.autograd.grad(m(x)[:, 1].sum(), x)
    patches = m.describe_execution()["patches_per_evaluation"]
    # forward and backward recomputation: every patch of every mirrored copy (8) of both folds, twice
    assert len(calls) == 2 * patches * 8 * 2
    assert m.calls == {"forward": patches * 8 * 2, "backward": patches * 8 * 2, "reused": 0}
    assert m.network_calls(x) == patches * 8 * 2  # the source's cost, known before any network runs
    # the same scan again (the engine's prediction pass, then the method): the forward is reused, not rerun
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(m(x2)[:, 1].sum(), x2)
    assert m.calls == {"forward": patches * 16, "backward": patches * 32, "reused": patches * 16}
    torch.testing.assert_close(g2, g, rtol=0, atol=0)
    with torch.no_grad():  # other weights (a randomised copy, an edited weight): computed again
        next(m.folds[0].parameters()).mul_(1.0)
        m(x)
    assert m.calls["forward"] == patches * 32 and m.calls["reused"] == patches * 16

    def plain(data, ens, plan):  # the same ensemble with one whole graph
        padded = plan.pad(data)
        total = 0
        for net in ens.networks:
            acc = torch.zeros((ens.num_heads, *plan.padded))
            n = torch.zeros(plan.padded)
            for sl in plan.slicers:
                y = ens.predict_patch(net, padded[sl][None])[0] * plan.gaussian.float()
                acc = acc + torch.nn.functional.pad(y, _pad_for(sl, plan.padded))
                n[sl[1:]] += plan.gaussian.float()
            total = total + (acc / n)[(slice(None), *plan.revert)]
        total = total / len(ens.networks)
        value = ens.logits(data.detach(), plan).float()  # nnU-Net's float16 numbers, this graph's gradient
        return total + (value - total).detach()

    orig = W.EnsembleFunction.apply
    W.EnsembleFunction.apply = plain
    try:
        xr = x.detach().requires_grad_(True)
        (g_ref,) = torch.autograd.grad(m(xr)[:, 1].sum(), xr)
    finally:
        W.EnsembleFunction.apply = orig
    assert g.abs().max() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))


def _pad_for(sl, padded):
    pad = []
    for s, n in zip(reversed(sl[1:]), reversed(padded)):
        pad.extend([s.start, n - s.stop])
    return pad


def test_methods_through_the_pipeline(folder, scan_img, tmp_path):
    img, path = scan_img
    cfg = parse_config({
        "model": {"nnunet": str(folder), "folds": [0], "mirroring": False},
        "volumes": [str(path)], "target": {"classes": [1]},
        "methods": [{"name": "saliency"}, {"name": "occlusion", "params": {"window": 4, "stride": 4}},
                    {"name": "layer_gradcam", "layers": ["network_input"]},
                    {"name": "integrated_gradients", "params": {"n_steps": 8, "baseline": "blur"}}],
        "output": {"dir": str(tmp_path / "out"), "probabilities": True}}, base=tmp_path)
    result = run(cfg)
    assert result.status == "completed" and not result.failed
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["model"]["folds_choice"] == "given (model.folds)"
    assert manifest["model"]["mirroring"] is False and manifest["model"]["mirroring_choice"].startswith("off")
    assert manifest["model"]["class_names"] == ["background", "vessel"]
    for rec in manifest["results"]:
        out = nib.load(tmp_path / "out" / rec["file"])
        assert out.shape == img.shape and np.allclose(out.affine, img.affine)
        assert np.isfinite(out.get_fdata()).all() and np.abs(out.get_fdata()).max() > 0
        assert rec["execution"]["pipeline"] == "nnunet" and "scan" in rec["execution"]["attribution_grid"]
        assert rec["patch_evaluations"] >= rec["model_evaluations"] * rec["execution"]["patches_per_evaluation"]
        # the plan's patch x mirror x fold count of the method's forward calls is what ran
        ex = rec["execution"]
        ran = ex["forward_network_calls"] + ex["reused_network_calls"]  # reused: the prediction pass's forward
        assert rec["expected_network_evaluations"] == ran == rec["model_inputs"] * ex["network_calls_per_input"]
        # reused: the scan the last forward saw (the prediction pass before saliency, the first job)
        assert ex["reused_network_calls"] in (0, ex["network_calls_per_input"])
        if rec["method"] == "saliency":
            assert ex["reused_network_calls"] == ex["network_calls_per_input"]
        assert ex["backward_network_calls"] == (0 if rec["method"] == "occlusion" else
                                                rec["model_inputs"] * ex["network_calls_per_input"])
    probs = nib.load(tmp_path / "out" / "scan__probabilities.nii.gz")
    assert probs.shape == (*img.shape, 2) and probs.get_data_dtype() == np.float32
    assert np.allclose(probs.affine, img.affine)
    np.testing.assert_allclose(np.moveaxis(probs.get_fdata(), -1, 0),
                               _ours(folder, img, folds=[0], mirroring=False), atol=1e-6)
    # IG's completeness against the pipeline's own F(x) - F(baseline)
    ig = next(r for r in manifest["results"] if r["method"] == "integrated_gradients")
    attr = nib.load(tmp_path / "out" / ig["file"]).get_fdata().sum()
    from esegeta_engine.methods._common import make_baseline

    loaded = load_source(cfg.model)
    loaded.module.bind_volume(img.header.get_zooms()[:3])
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    with torch.no_grad():
        p = loaded.module(x)
        region = p.argmax(1) == 1
        f = lambda t: float((loaded.module(t)[:, 1] * region).sum())  # noqa: E731
        delta = f(x) - f(make_baseline(x, "blur"))
    expected = abs(attr - delta) / abs(delta)
    assert ig["metrics"]["completeness_error"] == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_layers_inside_the_folds_resolve_and_methods_not_built_there_are_refused(folder):
    loaded = load_source(ModelConfig(nnunet=folder, folds=[0]))
    layer = get_layer(loaded.module, "folds.0.encoder.stages.0")  # run per member (test_models_member_layer.py)
    assert loaded.module.runs_layer_per_member(layer)
    why = loaded.module.layer_method_refusal("layer_deeplift", "folds.0.encoder.stages.0")
    assert why is not None and "inside nnU-Net's fold networks is not built" in why[0] and "layer_gradcam" in why[1]
    for built in ("layer_gradcam", "layer_integrated_gradients", "layer_activation"):  # member_paths.py
        assert loaded.module.layer_method_refusal(built, "folds.0.encoder.stages.0") is None
    assert get_layer(loaded.module, "network_input") is loaded.module.network_input


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "plans.json").unlink(), "plans.json does not exist"),
    (lambda d: (d / "dataset.json").unlink(), "dataset.json does not exist"),
    (lambda d: (d / "fold_1" / "checkpoint_final.pth").unlink(), "fold_1/checkpoint_final.pth does not exist"),
])
def test_broken_folders_are_one_line_errors(folder, scan_img, tmp_path, capsys, damage, message):
    d = _copy(folder, tmp_path)
    damage(d)
    out = tmp_path / "out"
    rc = main(["explain", "--nnunet", str(d), "--folds", "0", "1", "--volume", str(scan_img[1]),
               "--method", "saliency", "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "fix:" in err
    assert not out.exists()


def test_configuration_the_plans_lack(folder):
    with pytest.raises(ModelLoadError, match="(?s)no configuration '3d_lowres'.*set model.configuration"):
        load_source(ModelConfig(nnunet=folder, configuration="3d_lowres", folds=[0]))
    with pytest.raises(ModelLoadError, match="cascade"):
        load_source(ModelConfig(nnunet=folder, configuration="3d_cascade_fullres", folds=[0]))


def test_pickled_checkpoint_names_the_object_and_the_choice(folder, tmp_path):
    d = _copy(folder, tmp_path)
    ck = d / "fold_0" / "checkpoint_final.pth"
    data = torch.load(ck, weights_only=False)
    data["logging"]["odd"] = partial(print)  # a Python object, not data
    torch.save(data, ck)
    with pytest.raises(PickledModuleError,
                       match=r"(?s)fold_0/checkpoint_final.pth .*functools\.partial.*--trust-pickled"):
        load_source(ModelConfig(nnunet=d, folds=[0]))
    assert load_source(ModelConfig(nnunet=d, folds=[0]), Trust(pickled=True)).source == "nnunet"


def test_unknown_trainer_is_refused_by_name(folder, tmp_path):
    d = _copy(folder, tmp_path)
    ck = d / "fold_0" / "checkpoint_final.pth"
    data = torch.load(ck, weights_only=False)
    data["trainer_name"] = "MyPrivateTrainer"
    torch.save(data, ck)
    with pytest.raises(ModelLoadError, match="'MyPrivateTrainer', which nnU-Net cannot locate"):
        load_source(ModelConfig(nnunet=d, folds=[0]))


def test_channel_count_must_match_dataset_json(folder, tmp_path, capsys):
    img = nib.Nifti1Image(np.ones((14, 11, 6, 2), np.float32), np.diag([*SCAN_SPACING, 1.0]))
    nib.save(img, tmp_path / "two.nii.gz")
    rc = main(["explain", "--nnunet", str(folder), "--folds", "0", "--volume", str(tmp_path / "two.nii.gz"),
               "--method", "saliency", "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "dataset.json lists 1 input channel(s) (MRI)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_predict_command_writes_probabilities_on_the_scan_grid(folder, scan_img, tmp_path, capsys):
    img, path = scan_img
    rc = main(["predict", "--nnunet", str(folder), "--folds", "0", "--no-mirroring", "--volume", str(path),
               "--out", str(tmp_path / "pred")])
    assert rc == 0
    probs = nib.load(tmp_path / "pred" / "scan__probabilities.nii.gz")
    labels = nib.load(tmp_path / "pred" / "scan__prediction.nii.gz")
    assert probs.shape == (*img.shape, 2) and np.allclose(probs.affine, img.affine)
    np.testing.assert_array_equal(labels.get_fdata().astype(int), probs.get_fdata().argmax(-1))
    np.testing.assert_allclose(probs.get_fdata().sum(-1), 1.0, atol=1e-5)
    info = json.loads((tmp_path / "pred" / "prediction.json").read_text())
    assert info["model"]["mirroring"] is False
    capsys.readouterr()
    # flags the nnU-Net pipeline decides itself are said to be unused (they were dropped without a word)
    rc = main(["predict", "--nnunet", str(folder), "--folds", "0", "--no-mirroring", "--volume", str(path),
               "--orientation", "LPS", "--patch-size", "8", "--out", str(tmp_path / "flags"), "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and "preprocess.orientation 'LPS' is not used" in err and "patch_size 8 is not used" in err
    np.testing.assert_array_equal(nib.load(tmp_path / "flags" / "scan__probabilities.nii.gz").get_fdata(),
                                  probs.get_fdata())  # and indeed unused: the same probabilities


def test_members_each_fold_and_each_mirror_alone_average_to_the_ensemble(folder, scan_img):
    from esegeta_engine.evaluation.stability import members_of

    img, _ = scan_img
    m = load_source(ModelConfig(nnunet=folder, folds=[0, 1])).module
    m.bind_volume(img.header.get_zooms()[:3])
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    folds, mirrors = m.members("folds"), m.members("mirrors")
    assert [f.member_name for f in folds] == ["fold 0", "fold 1"] and len(mirrors) == 8
    assert mirrors[0].member_name == "no mirroring" and [f.member_name for f in members_of(m)] == ["fold 0", "fold 1"]  # stability's protocol
    info = m._prepare(x[0])
    data, plan = info.pop("data"), info["plan"]
    weight = torch.zeros(plan.padded)  # nnU-Net's Gaussian sum (max 10): float16 underflows where it is tiny
    for sl in plan.slicers:
        weight[sl[1:]] += plan.gaussian.float()
    weight = weight[plan.revert]
    with torch.no_grad():
        ensemble = m.ensemble.logits(data, plan).float()
        probs = m(x)[0]
        for members, floor in ((folds, 1e-7), (mirrors, 1e-5)):
            calls = []
            for mm in members:
                mm.bind_monitor(calls.append)
            # nnU-Net averages the members' logits (float16 accumulation), then the softmax
            mean = torch.stack([mm.ensemble.logits(data, plan).float() for mm in members]).mean(0)
            assert len(calls) == len(plan.slicers) * m.ensemble.calls_per_patch  # each call made once overall
            # (a mirrored copy alone underflows in float16 where its Gaussian weight is below ~1e-5: 5 % of voxels)
            kept = weight > floor
            assert kept.float().mean() > 0.9
            torch.testing.assert_close(mean[:, kept], ensemble[:, kept], rtol=0, atol=4e-3)
        # the folds' mean logits, through nnU-Net's resampling and softmax, are the ensemble's probabilities
        mean = torch.stack([f.ensemble.logits(data, plan).float() for f in folds]).mean(0)
        torch.testing.assert_close(m._to_scan(mean, info, logits=True), probs, rtol=0, atol=2e-3)
        one = folds[1](x)[0]  # a member is the whole pipeline with that fold alone
    assert one.shape == probs.shape and torch.allclose(one.sum(0), torch.ones(()), atol=1e-5)
    assert not torch.allclose(one, folds[0](x)[0], atol=1e-4)
