"""Layer methods on layers inside a MONAI bundle's network under its sliding window (models/member_bundle.py).

References written here, independent of the engine's window and canvas: MONAI's own
``sliding_window_inference`` over the whole small pipeline in one autograd graph (every patch's copy of
the layer a separate node), and MONAI's stitching of each patch's upsampled activation for layer
activation. 3D (the test bundle) and 2D (a 2D bundle written here).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("monai")

import bundle_setup as B  # noqa: E402
from test_models_member_layer import Score, _gradcam, _gxa, _keeper, _region  # noqa: E402

from esegeta_engine.config import ModelConfig, parse_config  # noqa: E402
from esegeta_engine.forward.patch_layer import patchwise_layer_forward, patchwise_layer_map  # noqa: E402
from esegeta_engine.models import Trust, get_layer, load_source  # noqa: E402
from esegeta_engine.models.member_paths import MemberLayerPath  # noqa: E402
from esegeta_engine.pipeline import run  # noqa: E402

LAYER = "network.down_1"
CONFIG_2D = B.config(
    network_def={**B.CONFIG["network_def"], "spatial_dims": 2},
    preprocessing={"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -50, "a_max": 250, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    inferer={"_target_": "SlidingWindowInferer", "roi_size": [16, 16], "sw_batch_size": 2, "overlap": 0.5,
             "mode": "gaussian"})


def _write_2d(root):
    from monai.networks.nets import BasicUNet

    B.write_bundle(root, CONFIG_2D, weights=False)
    torch.manual_seed(0)
    net = BasicUNet(**{k: v for k, v in CONFIG_2D["network_def"].items() if k != "_target_"})
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def _scan_2d(path):
    rng = np.random.default_rng(3)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in (30, 22)], indexing="ij")
    blob = sum((g / 0.6) ** 2 for g in grid) < 1
    img = (rng.normal(50, 20, (30, 22)) + 120 * blob).astype(np.float32)
    nib.save(nib.Nifti1Image(img, np.diag([0.8, 1.3, 1.0, 1.0])), path)
    return path


@pytest.fixture(scope="module", params=[3, 2])
def bundle(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"bundle{request.param}d")
    if request.param == 3:
        root, scan = B.write_bundle(tmp / "tiny_bundle"), B.oblique_scan(tmp / "scan.nii.gz")
    else:
        root, scan = _write_2d(tmp / "tiny_bundle_2d"), _scan_2d(tmp / "scan.nii.gz")
    img = nib.load(scan)
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    pipe = load_source(ModelConfig(bundle=root), Trust(bundle=True)).module
    pipe.bind_volume(img.affine)
    roi = tuple(pipe.window.settings.patch_size)
    return SimpleNamespace(root=root, scan=scan, img=img, x=x, pipe=pipe, roi=roi, nd=len(roi))


def _monai(pipe, roi, net):
    """The same pipeline with MONAI's own sliding window: one whole autograd graph."""
    from monai.inferers import sliding_window_inference

    pipe.__dict__["saved_window"] = pipe.window
    pipe.__dict__["window"] = None
    pipe._infer = lambda b: sliding_window_inference(b.float(), roi, 2, net, overlap=0.5, mode="gaussian")


def _restore(pipe):
    pipe.__dict__["window"] = pipe.__dict__.pop("saved_window")
    del pipe._infer


def test_layer_activation_equals_monais_stitching_of_every_patch(bundle):
    from monai.inferers import sliding_window_inference

    pipe, layer = bundle.pipe, get_layer(bundle.pipe, LAYER)
    calls = []
    pipe.bind_monitor(calls.append)
    ours = patchwise_layer_forward(Score(pipe, None), layer, bundle.x, False,
                                   lambda a, items: a.sum(1, keepdim=True), "blend", "layer_activation", LAYER)
    assert ours.shape == bundle.x.shape and torch.isfinite(ours).all() and ours.abs().max() > 0
    item = pipe._last[0]
    data = item[pipe.steps.key].as_tensor()[None].float()
    assert pipe.calls["forward"] == sum(calls) == len(pipe.window.grid(data.shape[2:], data.device))

    def patch_map(patch):  # each patch's layer activation, channels summed, upsampled to the patch
        seen = []
        h = layer.register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            pipe.network(patch)
        finally:
            h.remove()
        mode = "bilinear" if bundle.nd == 2 else "trilinear"
        return F.interpolate(seen[0].sum(1, keepdim=True), size=patch.shape[2:], mode=mode, align_corners=False)

    with torch.no_grad():
        stitched = sliding_window_inference(data, bundle.roi, 2, patch_map, overlap=0.5, mode="gaussian")[0]
    ref = pipe.steps.invert_map(stitched, item)
    torch.testing.assert_close(ours[0], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_layer_integrated_gradients_total_equals_one_graph_of_the_pipeline(bundle):
    pipe, layer, x = bundle.pipe, get_layer(bundle.pipe, LAYER), bundle.x
    region = _region(pipe, x)
    region = region if region.sum() > 0 else torch.ones_like(region)  # class 1 predicted somewhere, or everywhere
    params = {"attribute_to_layer_input": False, "channel_reduce": "sum", "method": "gausslegendre", "n_steps": 4,
              "baseline": "zero"}
    ctx = SimpleNamespace(score_model=Score(pipe, region), layer=layer, layer_name=LAYER, extra={})
    ours = MemberLayerPath(ctx, params, pipe).attribute(x, target=1)
    total = float(ctx.extra["raw_attribution_sum"][0])
    assert ours.shape == x.shape and torch.isfinite(ours).all()

    from captum.attr._utils.approximation_methods import approximation_parameters

    steps, alphas = approximation_parameters("gausslegendre")
    ref = 0.0
    _monai(pipe, bundle.roi, pipe.network)
    try:
        for w, alpha in zip(steps(4), alphas(4)):
            copies = []
            hs = [layer.register_forward_hook(lambda m, a, out, s=float(alpha): out * s),
                  layer.register_forward_hook(_keeper(copies))]
            try:
                Score(pipe, region)(x.clone().requires_grad_(True))[0, 1].backward()
            finally:
                for h in hs:
                    h.remove()
            assert len(copies) > 1  # one copy per patch
            ref += w * sum(float(((c / alpha) * c.grad).double().sum()) for c in copies)  # A_p . dF/dA_p(alpha)
        with torch.no_grad():
            h = layer.register_forward_hook(lambda m, a, out: out * 0)
            try:
                f0 = float(Score(pipe, region)(x)[0, 1])
            finally:
                h.remove()
            f1 = float(Score(pipe, region)(x)[0, 1])
    finally:
        _restore(pipe)
    assert abs(ref) > 0
    assert total == pytest.approx(ref, rel=1e-4)
    print(f"{bundle.nd}D layer IG total {total:.5g}, one-graph reference {ref:.5g}, F(A) - F(0) = {f1 - f0:.5g}")


def test_gradient_maps_inside_the_2d_and_3d_bundle_equal_one_graph_of_the_pipeline(bundle):
    pipe, layer, x = bundle.pipe, get_layer(bundle.pipe, LAYER), bundle.x
    region = _region(pipe, x)
    region = region if region.sum() > 0 else torch.ones_like(region)  # class 1 predicted somewhere, or everywhere
    ours, total = patchwise_layer_map(Score(pipe, region), layer, x, 1, False, _gxa, "sum", "gxa", LAYER)
    cam, _ = patchwise_layer_map(Score(pipe, region), layer, x, 1, False, _gradcam, "blend", "gc", LAYER)
    assert ours.shape == cam.shape == x.shape and cam.min() >= 0 and cam.max() > 0
    copies = []
    _monai(pipe, bundle.roi, pipe.network)
    h = layer.register_forward_hook(_keeper(copies))
    try:
        Score(pipe, region)(x.clone().requires_grad_(True))[0, 1].backward()
    finally:
        h.remove()
        _restore(pipe)
    ref = sum(float((c.grad * c).double().sum()) for c in copies)
    assert len(copies) > 1 and abs(ref) > 0
    assert float(total[0]) == pytest.approx(ref, rel=1e-4)


def test_bundle_layer_activation_and_ig_through_the_engine(bundle, tmp_path):
    with torch.no_grad():
        labels = bundle.pipe(bundle.x).argmax(1)
    cls = int(torch.bincount(labels.flatten()[labels.flatten() > 0], minlength=2).argmax()) if labels.max() else 0
    cfg = parse_config({
        "model": {"bundle": str(bundle.root)}, "volumes": [str(bundle.scan)], "target": {"classes": [cls]},
        "methods": [{"name": "layer_activation", "layers": [LAYER]},
                    {"name": "layer_integrated_gradients", "layers": [LAYER], "params": {"n_steps": 2}},
                    {"name": "layer_conductance", "layers": [LAYER]}],
        "output": {"dir": str(tmp_path / "out")}}, base=tmp_path)
    result = run(cfg, trust_bundle=True)
    manifest = json.loads(result.manifest_path.read_text())
    done = {r["method"]: r for r in manifest["results"] if r["status"] == "ok"}
    assert set(done) == {"layer_activation", "layer_integrated_gradients"}
    for rec in done.values():
        out = nib.load(tmp_path / "out" / rec["file"])
        assert out.shape == bundle.img.shape and np.allclose(out.affine, bundle.img.affine)
        assert np.isfinite(out.get_fdata()).all() and np.abs(out.get_fdata()).max() > 0
        ex = rec["execution"]  # every patch ran once per pass (activation: 1 pass; IG: n_steps passes)
        passes = 1 if rec["method"] == "layer_activation" else 2
        planned = rec["expected_network_evaluations"]
        assert planned == ex["forward_network_calls"] == passes * ex["patches_per_evaluation"]
        assert rec["expected_evaluations"] == rec["model_evaluations"] == passes  # one pipeline pass per point
    assert done["layer_integrated_gradients"]["execution"]["backward_network_calls"] == 2 * ex["patches_per_evaluation"]
    refused = next(r for r in manifest["results"] if r["method"] == "layer_conductance")
    assert refused["status"] != "ok" and "inside the bundle's network" in json.dumps(refused)
