"""Multi-member CAMs inside nnU-Net's folds against a reference written out here, not through member_layer.

The reference runs the whole ensemble in one autograd graph (every fold, mirrored copy and patch a
separate network call), keeps every call's layer activation and its gradient, and applies the documented
formula (docs/models.md): each member's CAM from its own ``A_k``, ``G_k`` (flipped back for a mirrored
copy), interpolated to its patch (a mirrored copy's moved by ``S - 1`` voxels along each flipped axis of
cumulative stride ``S``, the edge repeated), weighted with nnU-Net's Gaussian, ``M = sum_k w_p(k) up(m_k) / (n W)``
with ``n`` = mirrored copies x folds, cropped and resampled to the scan like the probabilities.
Also: a bundle whose inferer is ``SimpleInferer`` (the network sees the whole grid once).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("nnunetv2")

import bundle_setup as B  # noqa: E402
import nnunet_setup as S  # noqa: E402
from test_models_member_layer import LAYER, Score, _gradcam, _pipe, _plain, _region, _scan  # noqa: E402

from esegeta_engine.config import ModelConfig, parse_config  # noqa: E402
from esegeta_engine.forward.patch_layer import patchwise_layer_map  # noqa: E402
from esegeta_engine.models import Trust, get_layer, load_source  # noqa: E402
from esegeta_engine.pipeline import run  # noqa: E402


def _layercam(a, g, items):
    return (g.clamp(min=0) * a).sum(1, keepdim=True).clamp(min=0)


def reference_cam(pipe, x, region, cam, monkeypatch):
    """The documented blend, from one graph of the whole ensemble (module docstring)."""
    from esegeta_engine.models.nnunet import window as W

    copies = []

    def keep(module, args, out):
        if out.requires_grad:
            out.retain_grad()
            copies.append(out)

    ens = pipe.ensemble
    name = LAYER.split(".", 2)[2]
    handles = [dict(net.named_modules())[name].register_forward_hook(keep) for net in ens.networks]
    with monkeypatch.context() as mp:
        mp.setattr(W.EnsembleFunction, "apply", _plain)
        try:
            Score(pipe, region)(x.clone().requires_grad_(True))[0, 1].backward()
        finally:
            for h in handles:
                h.remove()
    info = pipe._last[0]
    plan = info["plan"]
    mirrors = [(), *ens.mirror_sets]  # the order predict_patch calls them in
    assert len(copies) == len(ens.networks) * len(plan.slicers) * len(mirrors)
    gauss = plan.gaussian.float()
    canvas = torch.zeros((1, *plan.padded))
    weight = torch.zeros(plan.padded)
    for sl in plan.slicers:
        weight[sl[1:]] += gauss
    k = 0
    for _ in ens.networks:
        for sl in plan.slicers:
            for axes in mirrors:
                a, g = copies[k].detach(), copies[k].grad
                k += 1
                if axes:
                    a, g = torch.flip(a, axes), torch.flip(g, axes)
                m = cam(a, g, None)
                size = tuple(gauss.shape)
                m = F.interpolate(m, size=size, mode="bilinear" if len(size) == 2 else "trilinear",
                                  align_corners=False)[0]
                for ax in axes:  # nnU-Net's kernel-3/padding-1 encoder: a flipped-back copy sits S - 1 voxels on
                    i = ax - 2
                    d = size[i] // a.shape[ax] - 1
                    m = m.index_select(i + 1, (torch.arange(size[i]) - d).clamp(0, size[i] - 1))
                canvas[(slice(None), *sl[1:])] += m * gauss
    n = len(ens.networks) * len(mirrors)
    m = (canvas / (n * weight))[(slice(None), *plan.revert)]
    return pipe._to_scan(m, info, logits=False)


@pytest.mark.parametrize("dim", [3, 2])
@pytest.mark.parametrize("cam", [_gradcam, _layercam], ids=["gradcam", "layercam"])
def test_multi_member_cam_equals_the_documented_blend(nnunet_folder, dim, cam, monkeypatch):
    if dim == 3:  # two folds x mirrored copies along one axis x 4 patches
        _, x = _scan((20, 12, 6), (0.9, 1.1, 2.5))
        pipe = _pipe(nnunet_folder, (0.9, 1.1, 2.5), folds=[0, 1])
        pipe.ensemble.mirror_axes = (1,)
    else:  # one fold x 4 mirrored copies x several slices and patches
        _, x = _scan((20, 14, 3), (1.0, 1.0, 2.0))
        pipe = _pipe(S.add_configuration(nnunet_folder, "2d", folds=(0,)), (1.0, 1.0, 2.0), folds=[0],
                     configuration="2d")
    region = _region(pipe, x)
    layer = get_layer(pipe, LAYER)
    ours, _ = patchwise_layer_map(Score(pipe, region), layer, x, 1, False, cam, "blend", "cam", LAYER)
    plan = pipe._last[0]["plan"]
    assert len(plan.slicers) > 1 and pipe.ensemble.calls_per_patch > 1
    ref = reference_cam(pipe, x, region, cam, monkeypatch)
    assert ref.abs().max() > 0 and ours.shape == x.shape
    torch.testing.assert_close(ours[0], ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


# -- a bundle whose inferer is SimpleInferer: the layer runs once, on the whole network grid --------------------
@pytest.fixture(scope="module")
def simple_bundle(tmp_path_factory):
    cfg = B.config(inferer={"_target_": "SimpleInferer"})
    root = B.write_bundle(tmp_path_factory.mktemp("bundle_simple") / "tiny_bundle", cfg)
    return root, B.oblique_scan(root.parent / "scan.nii.gz", shape=(32, 32, 24))


def test_simple_inferer_bundle_layer_cam_equals_a_hand_written_cam(simple_bundle):
    root, scan = simple_bundle
    img = nib.load(scan)
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    pipe = load_source(ModelConfig(bundle=root), Trust(bundle=True)).module
    pipe.bind_volume(img.affine)
    assert pipe.window is None
    region = _region(pipe, x)
    layer = get_layer(pipe, "network.down_1")
    assert not pipe.runs_layer_per_member(layer)  # one copy: Captum's own layer methods run

    from captum.attr import LayerGradCam

    score = Score(pipe, region)
    ours = LayerGradCam(score, layer).attribute(x, target=1, relu_attributions=True)
    ours = pipe.layer_map_to_input("network.down_1", ours)

    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append(out)

    h = layer.register_forward_hook(keep)
    try:
        score(x.clone().requires_grad_(True))[0, 1].backward()
    finally:
        h.remove()
    (a,) = seen
    cam = _gradcam(a.detach(), a.grad, None)
    grid = tuple(pipe._last[0][pipe.steps.key].shape[1:])
    cam = F.interpolate(cam, size=grid, mode="trilinear", align_corners=False)
    ref = pipe.steps.invert_map(cam[0], pipe._last[0])
    assert ref.abs().max() > 0 and ours.shape[2:] == x.shape[2:]
    torch.testing.assert_close(ours[0], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_simple_inferer_bundle_layer_methods_through_the_engine(simple_bundle, tmp_path):
    root, scan = simple_bundle
    img = nib.load(scan)
    layer = {"layers": ["network.down_1"]}
    cfg = parse_config({
        "model": {"bundle": str(root)}, "volumes": [str(scan)], "target": {"classes": [1]},
        "methods": [{"name": "layer_gradcam", **layer}, {"name": "layer_gradient_x_activation", **layer},
                    {"name": "layer_integrated_gradients", **layer, "params": {"n_steps": 2}}],
        "output": {"dir": str(tmp_path / "out")}}, base=tmp_path)
    manifest = json.loads(run(cfg, trust_bundle=True).manifest_path.read_text())
    done = {r["method"]: r for r in manifest["results"] if r["status"] == "ok"}
    assert set(done) == {"layer_gradcam", "layer_gradient_x_activation", "layer_integrated_gradients"}
    for rec in done.values():
        out = nib.load(tmp_path / "out" / rec["file"])
        assert out.shape == img.shape and np.allclose(out.affine, img.affine)
        assert np.isfinite(out.get_fdata()).all() and np.abs(out.get_fdata()).max() > 0
        assert rec["execution"]["patches_per_evaluation"] == 1
