"""Layer methods on layers inside nnU-Net's fold networks and a bundle's network.

References: Captum's layer methods on the plain fold network (one fold, no mirroring, one
patch); plain autograd through the whole ensemble in one graph (every fold, mirrored copy
and patch a separate copy of the layer) for the additive total; MONAI's
``sliding_window_inference`` for the bundle.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("nnunetv2")

import bundle_setup as B  # noqa: E402
import nnunet_setup as S  # noqa: E402

from esegeta_engine.config import ModelConfig, parse_config  # noqa: E402
from esegeta_engine.forward.patch_layer import patchwise_layer_map  # noqa: E402
from esegeta_engine.models import Trust, get_layer, load_source  # noqa: E402
from esegeta_engine.pipeline import run  # noqa: E402

LAYER = "folds.0.encoder.stages.1"  # stride 2: its grid is half the patch's


class Score(nn.Module):
    """A score model as the engine's: the pipeline's class probabilities summed over a fixed region."""

    def __init__(self, pipe: nn.Module, region: torch.Tensor) -> None:
        super().__init__()
        self.pipe, self.region, self.runner = pipe, region, None
        self.net = SimpleNamespace(model=pipe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.pipe(x) * self.region).flatten(2).sum(-1)


def _pipe(folder, zooms, **model):
    m = load_source(ModelConfig(nnunet=folder, **model)).module
    m.bind_volume(zooms)
    return m


def _scan(shape, spacing, seed=7):
    img, _ = S.scan(shape, spacing, seed=seed)
    return img, torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]


def _region(pipe, x):
    with torch.no_grad():
        return (pipe(x).argmax(1, keepdim=True) == 1).float()


def _gxa(a, g, items):
    return (g * a).sum(1, keepdim=True)


def _gradcam(a, g, items):
    return ((g.mean(dim=tuple(range(2, g.dim())), keepdim=True) * a).sum(1, keepdim=True)).clamp(min=0)


@pytest.fixture(scope="module")
def folder(nnunet_folder):
    return nnunet_folder


@pytest.fixture(scope="module")
def folder_2d(nnunet_folder):
    return S.add_configuration(nnunet_folder, "2d", folds=(0,))


# -- one fold, no mirroring, one patch: the plain network's layer method -------------------------------------
@pytest.mark.parametrize("dim", [3, 2])
@pytest.mark.parametrize("method", ["gradcam", "gxa"])
def test_one_member_equals_captum_on_the_plain_network(folder, folder_2d, dim, method):
    from captum.attr import LayerGradCam, LayerGradientXActivation

    if dim == 3:  # the preprocessed grid (8, 12, 15) fits one 3d_fullres patch (8, 12, 16)
        img, x = _scan((16, 12, 8), (1.0, 1.0, 2.0))
        pipe = _pipe(folder, (1.0, 1.0, 2.0), folds=[0], mirroring=False)
    else:  # one slice: one 2d patch (12, 16)
        img, x = _scan((16, 12, 1), (1.0, 1.0, 2.0))
        pipe = _pipe(folder_2d, (1.0, 1.0, 2.0), folds=[0], mirroring=False, configuration="2d")
    region = _region(pipe, x)
    score = Score(pipe, region)
    layer = get_layer(pipe, LAYER)
    per_copy = _gradcam if method == "gradcam" else _gxa
    ours, total = patchwise_layer_map(score, layer, x, 1, False, per_copy, "blend" if method == "gradcam" else "sum",
                                      method, LAYER)
    info = pipe._last[0]
    plan = info["plan"]
    assert len(plan.slicers) == 1
    assert ours.shape == x.shape

    with torch.no_grad():
        data = pipe._prepare(x[0])["data"]
        value = pipe.ensemble.logits(data, plan).float()
    net = pipe.folds[0]
    sl = plan.slicers[0]

    def forward(d):  # the plain network on the preprocessed input, then the pipeline's way back and the score
        y = net(plan.pad(d[0])[sl][None])[0]
        if len(plan.shape) > len(y.shape) - 1:  # a 2d patch: its slice
            y = y[:, None]
        y = y[(slice(None), *plan.revert)]
        y = y + (value - y).detach()  # nnU-Net's float16 numbers, the plain network's gradient
        probs = pipe._to_scan(y, info, logits=True)
        return (probs[None] * region).flatten(2).sum(-1)[:, 1]

    cls = LayerGradCam if method == "gradcam" else LayerGradientXActivation
    kwargs = {"relu_attributions": True} if method == "gradcam" else {}
    ref = cls(forward, layer).attribute(data[None], **kwargs)
    if method == "gxa":
        ref_total = float(ref.double().sum())
        ref = ref.sum(1, keepdim=True)
        assert float(total[0]) == pytest.approx(ref_total, rel=2e-3, abs=1e-6 * float(ref.abs().sum()))
    size = tuple(s.stop - s.start for s in sl[1:] if isinstance(s, slice))
    ref = F.interpolate(ref, size=size, mode="bilinear" if len(size) == 2 else "trilinear", align_corners=False)[0]
    if len(plan.shape) > len(size):
        ref = ref[:, None]
    ref = pipe._to_scan(ref[(slice(None), *plan.revert)], info, logits=False)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours[0], ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


# -- every fold, mirrored copy and patch: additive totals against one autograd graph --------------------------
def _plain(data, ens, plan):
    """The ensemble in one graph (every member's layer is a separate node)."""
    padded = plan.pad(data)
    total = 0
    for net in ens.networks:
        acc = torch.zeros((ens.num_heads, *plan.padded))
        n = torch.zeros(plan.padded)
        for sl in plan.slicers:
            y = ens.predict_patch(net, padded[sl][None])[0] * plan.gaussian.float()
            place = torch.zeros_like(acc)
            place[(slice(None), *sl[1:])] = y
            acc = acc + place
            n[sl[1:]] += plan.gaussian.float()
        total = total + (acc / n)[(slice(None), *plan.revert)]
    total = total / len(ens.networks)
    value = ens.logits(data.detach(), plan).float()  # nnU-Net's float16 numbers, this graph's gradient
    return total + (value - total).detach()


def _keeper(copies):
    def keep(module, args, out):  # every graph-building call's output, its gradient kept
        if out.requires_grad:
            out.retain_grad()
            copies.append(out)
    return keep


@pytest.mark.parametrize("dim", [3, 2])
def test_additive_total_equals_every_member_summed_independently(folder, folder_2d, dim, monkeypatch):
    from esegeta_engine.models.nnunet import window as W

    if dim == 3:
        img, x = _scan((20, 12, 6), (0.9, 1.1, 2.5))
        pipe = _pipe(folder, (0.9, 1.1, 2.5), folds=[0, 1])
    else:
        img, x = _scan((20, 14, 3), (1.0, 1.0, 2.0))
        pipe = _pipe(folder_2d, (1.0, 1.0, 2.0), folds=[0], configuration="2d")
    region = _region(pipe, x)
    calls = []
    pipe.bind_monitor(calls.append)
    layer = get_layer(pipe, LAYER)
    ours, total = patchwise_layer_map(Score(pipe, region), layer, x, 1, False, _gxa, "sum", "gxa", LAYER)
    members = len(pipe._last[0]["plan"].slicers) * pipe.ensemble.calls_per_patch
    assert members > 2 * pipe.ensemble.calls_per_patch  # several patches, every mirrored copy and fold
    assert pipe.calls["backward"] == members  # each member recomputed once
    assert ours.shape == x.shape and torch.isfinite(ours).all()

    copies = []  # the reference: the layer's value in every network call of one whole graph
    name = LAYER.split(".", 2)[2]
    handles = [dict(net.named_modules())[name].register_forward_hook(_keeper(copies))
               for net in pipe.ensemble.networks]
    monkeypatch.setattr(W.EnsembleFunction, "apply", _plain)
    try:
        Score(pipe, region)(x.clone().requires_grad_(True))[0, 1].backward()
    finally:
        for h in handles:
            h.remove()
    assert len(copies) == members
    ref = sum(float((c.grad * c).double().sum()) for c in copies)
    assert abs(ref) > 0
    assert float(total[0]) == pytest.approx(ref, rel=1e-3)


# -- through the engine: maps on the scan's grid, planned == counted, refusals by name -------------------------
def test_fold_layer_methods_through_the_engine(folder, tmp_path):
    img, _ = S.scan((20, 18, 11), (0.9, 1.1, 2.5), seed=5)
    path = tmp_path / "scan.nii.gz"
    nib.save(img, path)
    cfg = parse_config({
        "model": {"nnunet": str(folder), "folds": [0, 1]}, "volumes": [str(path)], "target": {"classes": [1]},
        "methods": [{"name": "layer_gradcam", "layers": [LAYER]},
                    {"name": "layer_gradient_x_activation", "layers": [LAYER]},
                    {"name": "layer_conductance", "layers": [LAYER]}],
        "output": {"dir": str(tmp_path / "out")}}, base=tmp_path)
    result = run(cfg)
    manifest = json.loads(result.manifest_path.read_text())
    done = {r["method"]: r for r in manifest["results"] if r["status"] == "ok"}
    assert set(done) == {"layer_gradcam", "layer_gradient_x_activation"}
    for rec in done.values():
        out = nib.load(tmp_path / "out" / rec["file"])
        assert out.shape == img.shape and np.allclose(out.affine, img.affine)
        assert np.isfinite(out.get_fdata()).all() and np.abs(out.get_fdata()).max() > 0
        ex = rec["execution"]
        assert "layers inside the folds" in ex["layer_grid"]
        ran = ex["forward_network_calls"] + ex["reused_network_calls"]
        assert rec["expected_network_evaluations"] == ran == ex["network_calls_per_input"]
        assert ex["backward_network_calls"] == ex["network_calls_per_input"]  # every member's copy, once
    refused = next(r for r in manifest["results"] if r["method"] == "layer_conductance")
    assert refused["status"] != "ok"
    assert "inside nnU-Net's fold networks is not built" in json.dumps(refused)


def test_the_fold_list_itself_is_refused_by_name(folder):
    from esegeta_engine.errors import ModelLoadError

    pipe = load_source(ModelConfig(nnunet=folder, folds=[0])).module
    with pytest.raises(ModelLoadError, match="(?s)list of fold networks.*folds.0.encoder"):
        get_layer(pipe, "folds")
    assert get_layer(pipe, LAYER) is pipe.folds[0].encoder.stages[1]


# -- a bundle's network under its sliding window -------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = B.write_bundle(tmp_path_factory.mktemp("bundle") / "tiny_bundle")
    scan = B.oblique_scan(root.parent / "scan.nii.gz")
    return root, scan


def test_bundle_layer_total_equals_monais_sliding_window_summed(bundle):
    from monai.inferers import sliding_window_inference

    root, scan = bundle
    img = nib.load(scan)
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    pipe = load_source(ModelConfig(bundle=root), Trust(bundle=True)).module
    pipe.bind_volume(img.affine)
    region = _region(pipe, x)
    layer = get_layer(pipe, "network.down_1")
    ours, total = patchwise_layer_map(Score(pipe, region), layer, x, 1, False, _gxa, "sum", "gxa", "network.down_1")
    assert ours.shape == x.shape and torch.isfinite(ours).all() and ours.abs().max() > 0
    cam, _ = patchwise_layer_map(Score(pipe, region), layer, x, 1, False, _gradcam, "blend", "gc", "network.down_1")
    assert cam.shape == x.shape and cam.min() >= 0 and cam.max() > 0

    copies = []
    handle = layer.register_forward_hook(_keeper(copies))
    pipe.__dict__["window"] = None  # the same pipeline with MONAI's inferer, one whole graph
    pipe._infer = lambda b: sliding_window_inference(b.float(), (16, 16, 16), 2, pipe.network, overlap=0.5,
                                                     mode="gaussian")
    try:
        Score(pipe, region)(x.clone().requires_grad_(True))[0, 1].backward()
    finally:
        handle.remove()
    ref = sum(float((c.grad * c).double().sum()) for c in copies)
    assert len(copies) > 1 and abs(ref) > 0
    assert float(total[0]) == pytest.approx(ref, rel=1e-4)


def test_bundle_layer_methods_through_the_engine(bundle, tmp_path):
    root, scan = bundle
    img = nib.load(scan)
    cfg = parse_config({
        "model": {"bundle": str(root)}, "volumes": [str(scan)], "target": {"classes": [1]},
        "methods": [{"name": "layer_gradcam", "layers": ["network.down_1"]},
                    {"name": "layer_gradient_x_activation", "layers": ["network.down_1"]},
                    {"name": "layer_conductance", "layers": ["network.down_1"]}],
        "output": {"dir": str(tmp_path / "out")}}, base=tmp_path)
    result = run(cfg, trust_bundle=True)
    manifest = json.loads(result.manifest_path.read_text())
    done = {r["method"]: r for r in manifest["results"] if r["status"] == "ok"}
    assert set(done) == {"layer_gradcam", "layer_gradient_x_activation"}
    for rec in done.values():
        out = nib.load(tmp_path / "out" / rec["file"])
        assert out.shape == img.shape and np.allclose(out.affine, img.affine)
        assert np.isfinite(out.get_fdata()).all() and np.abs(out.get_fdata()).max() > 0
        ex = rec["execution"]
        assert rec["expected_network_evaluations"] == ex["forward_network_calls"] == ex["patches_per_evaluation"]
        assert ex["backward_network_calls"] == ex["patches_per_evaluation"]
    refused = next(r for r in manifest["results"] if r["method"] == "layer_conductance")
    assert refused["status"] != "ok" and "inside the bundle's network" in json.dumps(refused)
