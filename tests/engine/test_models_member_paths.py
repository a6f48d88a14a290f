"""Layer activation, layer IG and internal influence on layers inside nnU-Net's fold networks.

References: Captum (``LayerActivation``; ``IntegratedGradients`` on the function of the layer's value,
from a zero value) on the plain fold network for one fold, no mirroring and one patch; and, with every
fold, mirrored copy and patch, one autograd graph of the whole ensemble written out here in which every
member's copy of the layer is scaled by each path point.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("nnunetv2")

import nnunet_setup as S  # noqa: E402
from test_models_member_layer import LAYER, Score, _pipe, _plain, _region, _scan  # noqa: E402

from esegeta_engine.config import parse_config  # noqa: E402
from esegeta_engine.models import get_layer  # noqa: E402
from esegeta_engine.models.member_paths import MemberLayerPath  # noqa: E402
from esegeta_engine.pipeline import run  # noqa: E402


class Ctx:
    """The part of a method context the member path reads."""

    def __init__(self, score, layer, name=LAYER):
        self.score_model, self.layer, self.layer_name, self.extra = score, layer, name, {}


def _params(n_steps, method="gausslegendre", **kw):
    return {"baseline": "zero", "n_steps": n_steps, "method": method, "attribute_to_layer_input": False,
            "channel_reduce": "sum", **kw}


@pytest.fixture(scope="module")
def folder(nnunet_folder):
    return nnunet_folder


@pytest.fixture(scope="module")
def folder_2d(nnunet_folder):
    return S.add_configuration(nnunet_folder, "2d", folds=(0,))


def _one_member(folder, folder_2d, dim):
    if dim == 3:  # the preprocessed grid (8, 12, 15) fits one 3d_fullres patch (8, 12, 16)
        _, x = _scan((16, 12, 8), (1.0, 1.0, 2.0))
        pipe = _pipe(folder, (1.0, 1.0, 2.0), folds=[0], mirroring=False)
    else:
        _, x = _scan((16, 12, 1), (1.0, 1.0, 2.0))
        pipe = _pipe(folder_2d, (1.0, 1.0, 2.0), folds=[0], mirroring=False, configuration="2d")
    return pipe, x


def _to_scan(pipe, ref, plan, info):
    """A layer-grid map of the one patch -> the scan's grid, as the test of the CAMs does."""
    sl = plan.slicers[0]
    size = tuple(s.stop - s.start for s in sl[1:] if isinstance(s, slice))
    ref = F.interpolate(ref, size=size, mode="bilinear" if len(size) == 2 else "trilinear", align_corners=False)[0]
    if len(plan.shape) > len(size):
        ref = ref[:, None]
    return pipe._to_scan(ref[(slice(None), *plan.revert)], info, logits=False)


# -- one fold, no mirroring, one patch: Captum on the plain network ------------------------------------------
@pytest.mark.parametrize("dim", [3, 2])
def test_one_member_layer_ig_equals_captum_ig_of_the_layer_value(folder, folder_2d, dim):
    from captum.attr import IntegratedGradients, LayerActivation

    pipe, x = _one_member(folder, folder_2d, dim)
    region = _region(pipe, x)
    score = Score(pipe, region)
    layer = get_layer(pipe, LAYER)
    ctx = Ctx(score, layer)
    ours = MemberLayerPath(ctx, _params(6), pipe).attribute(x, target=1)
    total = float(ctx.extra["raw_attribution_sum"][0])
    info = pipe._last[0]
    plan = info["plan"]
    assert len(plan.slicers) == 1 and ours.shape == x.shape

    with torch.no_grad():
        data = pipe._prepare(x[0])["data"]
    net, sl = pipe.folds[0], plan.slicers[0]
    patch = plan.pad(data)[sl][None]
    a = LayerActivation(net, layer).attribute(patch)

    def replaced(z):  # the deployed score with the layer's value replaced by z (nnU-Net's float16 forward)
        h = layer.register_forward_hook(lambda m, args, out: z.detach())
        with torch.no_grad():
            value = pipe.ensemble.logits(data, plan).float()
        h.remove()
        h = layer.register_forward_hook(lambda m, args, out: z)
        try:
            y = net(patch)[0]
        finally:
            h.remove()
        if len(plan.shape) > len(y.shape) - 1:
            y = y[:, None]
        y = y[(slice(None), *plan.revert)]
        y = y + (value - y).detach()
        probs = pipe._to_scan(y, info, logits=True)
        return (probs[None] * region).flatten(2).sum(-1)[:, 1]

    ref = IntegratedGradients(replaced).attribute(a, baselines=torch.zeros_like(a), n_steps=6,
                                                  method="gausslegendre", internal_batch_size=1)
    assert total == pytest.approx(float(ref.double().sum()), rel=2e-3, abs=1e-6 * float(ref.abs().sum()))
    ref = _to_scan(pipe, ref.sum(1, keepdim=True), plan, info)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours[0], ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))

    from esegeta_engine.forward.patch_layer import patchwise_layer_forward

    act = patchwise_layer_forward(score, layer, x, False, lambda a, items: a.sum(1, keepdim=True), "blend",
                                  "layer_activation", LAYER)
    ref = _to_scan(pipe, a.sum(1, keepdim=True), plan, info)
    torch.testing.assert_close(act[0], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# -- every fold, mirrored copy and patch: one autograd graph per path point ----------------------------------
def _members_setup(folder, folder_2d, dim):
    if dim == 3:  # two folds x 4 patches (mirrored copies: the 2D case and the completeness test)
        _, x = _scan((20, 12, 6), (0.9, 1.1, 2.5))
        pipe = _pipe(folder, (0.9, 1.1, 2.5), folds=[0, 1], mirroring=False)
    else:
        _, x = _scan((20, 14, 3), (1.0, 1.0, 2.0))
        pipe = _pipe(folder_2d, (1.0, 1.0, 2.0), folds=[0], configuration="2d")
    return pipe, x


def _graph_total(pipe, x, region, alpha, monkeypatch):
    """sum_k sum A_k * dF/dA_k at the point where every member's copy holds alpha * A_k, in one graph."""
    from esegeta_engine.models.nnunet import window as W

    raw, scaled = [], []

    def scale(module, args, out):  # every call, the float16 forward of nnU-Net's numbers included
        new = out * alpha
        if out.requires_grad:
            new.retain_grad()
            raw.append(out.detach())
            scaled.append(new)
        return new

    name = LAYER.split(".", 2)[2]
    handles = [dict(net.named_modules())[name].register_forward_hook(scale) for net in pipe.ensemble.networks]
    with monkeypatch.context() as mp:
        mp.setattr(W.EnsembleFunction, "apply", _plain)
        try:
            score = Score(pipe, region)(x.clone().requires_grad_(True))[0, 1]
            score.backward()
        finally:
            for h in handles:
                h.remove()
    return sum(float((r * s.grad).double().sum()) for r, s in zip(raw, scaled)), len(raw), float(score.detach())


@pytest.mark.parametrize("dim", [3, 2])
def test_layer_ig_total_equals_the_whole_ensemble_in_one_graph(folder, folder_2d, dim, monkeypatch):
    from captum.attr._utils.approximation_methods import approximation_parameters

    pipe, x = _members_setup(folder, folder_2d, dim)
    region = _region(pipe, x)
    calls = []
    pipe.bind_monitor(calls.append)
    layer = get_layer(pipe, LAYER)
    ctx = Ctx(Score(pipe, region), layer)
    n_steps = 2
    ours = MemberLayerPath(ctx, _params(n_steps, "riemann_trapezoid"), pipe).attribute(x, target=1)
    total = float(ctx.extra["raw_attribution_sum"][0])
    members = len(pipe._last[0]["plan"].slicers) * pipe.ensemble.calls_per_patch
    assert members > 2 * pipe.ensemble.calls_per_patch and members >= 8
    # each path point: one forward and one patch-wise backward of every member (nothing reused)
    assert pipe.calls == {"forward": n_steps * members, "backward": n_steps * members, "reused": 0}
    assert ours.shape == x.shape and torch.isfinite(ours).all()

    steps, alphas = approximation_parameters("riemann_trapezoid")
    ref = 0.0
    for w, alpha in zip(steps(n_steps), alphas(n_steps)):
        t, copies, _ = _graph_total(pipe, x, region, float(alpha), monkeypatch)
        assert copies == members
        ref += float(w) * t
    assert abs(ref) > 0
    assert total == pytest.approx(ref, rel=1e-3)


def test_layer_ig_completeness_through_the_deployed_pipeline(folder_2d):
    """sum attr ~ F(every copy = A) - F(every copy = 0), both through our pipeline (2D: mirrored copies, patches)."""
    _, x = _scan((20, 14, 1), (1.0, 1.0, 2.0))
    pipe = _pipe(folder_2d, (1.0, 1.0, 2.0), folds=[0], configuration="2d")
    region = _region(pipe, x)
    layer = get_layer(pipe, LAYER)
    score = Score(pipe, region)
    ctx = Ctx(score, layer)
    MemberLayerPath(ctx, _params(8), pipe).attribute(x, target=1)
    assert len(pipe._last[0]["plan"].slicers) > 1 and pipe.ensemble.calls_per_patch == 4
    total = float(ctx.extra["raw_attribution_sum"][0])
    name = LAYER.split(".", 2)[2]
    handles = [dict(net.named_modules())[name].register_forward_hook(lambda m, a, out: out * 0)
               for net in pipe.ensemble.networks]
    try:
        with torch.no_grad():
            f0 = float(score(x)[0, 1])
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        f1 = float(score(x)[0, 1])
    assert abs(f1 - f0) > 1e-3 * abs(f1)
    assert total == pytest.approx(f1 - f0, rel=1e-2)


# -- through the engine: planned == counted, refusals with their reason ---------------------------------------
def test_member_path_methods_through_the_engine(folder, tmp_path):
    img, _ = S.scan((20, 18, 11), (0.9, 1.1, 2.5), seed=5)
    path = tmp_path / "scan.nii.gz"
    nib.save(img, path)
    layer = {"layers": [LAYER]}
    cfg = parse_config({
        "model": {"nnunet": str(folder), "folds": [0, 1], "mirroring": False}, "volumes": [str(path)],
        "target": {"classes": [1]},  # two folds x patches: several members, few network calls
        "methods": [{"name": "layer_activation", **layer},
                    {"name": "layer_integrated_gradients", **layer, "params": {"n_steps": 2}},
                    {"name": "internal_influence", **layer, "params": {"n_steps": 2}},
                    {"name": "layer_integrated_gradients", **layer, "params": {"n_steps": 2, "baseline": "mean"}},
                    {"name": "layer_conductance", **layer},
                    {"name": "score_cam", **layer}],
        "output": {"dir": str(tmp_path / "out")}}, base=tmp_path)
    manifest = json.loads(run(cfg).manifest_path.read_text())
    done = {r["method"]: r for r in manifest["results"] if r["status"] == "ok"}
    assert set(done) == {"layer_activation", "layer_integrated_gradients", "internal_influence"}
    for name, rec in done.items():
        out = nib.load(tmp_path / "out" / rec["file"])
        assert out.shape == img.shape and np.allclose(out.affine, img.affine)
        assert np.isfinite(out.get_fdata()).all() and np.abs(out.get_fdata()).max() > 0
        ex = rec["execution"]
        per_input = ex["network_calls_per_input"]
        passes = 1 if name == "layer_activation" else 2
        assert rec["expected_network_evaluations"] == passes * per_input
        assert ex["forward_network_calls"] + ex["reused_network_calls"] == passes * per_input
        assert ex["backward_network_calls"] == (0 if name == "layer_activation" else passes * per_input)
    refused = {r["method"] + str(r.get("params", {}).get("baseline", "")): json.dumps(r)
               for r in manifest["results"] if r["status"] != "ok"}
    text = " ".join(refused.values())
    assert "not an input baseline" in text or "zero activation" in text
    assert "exactly its layer IG" in text
    assert "pipeline pass" in text and "per channel" in text
