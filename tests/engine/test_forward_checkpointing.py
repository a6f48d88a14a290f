"""Activation checkpointing (forward/checkpointing.py): same gradients, same counts, model unchanged.

References: the same gradient computed without checkpointing (plain autograd through nnU-Net's own
``dynamic_network_architectures`` U-Nets, and through the deployed nnU-Net pipeline built with
nnU-Net's tools); the model's state before the run.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.errors import ConfigError
from esegeta_engine.forward.checkpointing import checkpointed, method_checkpointing, unet_segments
from esegeta_engine.methods.registry import get_method, list_methods


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "dicts": [{k: v for k, v in m.__dict__.items() if not k.startswith("_")} for m in model.modules()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                  for m in model.modules()],
    }


def _same(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert a["requires_grad"] == b["requires_grad"] and a["training"] == b["training"]
    assert a["hooks"] == b["hooks"]
    assert len(a["dicts"]) == len(b["dicts"])
    for da, db in zip(a["dicts"], b["dicts"]):
        assert da.keys() == db.keys() and all(da[k] is db[k] or da[k] == db[k] for k in da)


@pytest.mark.parametrize("fail", [False, True], ids=["success", "exception"])
def test_checkpointed_restores_the_model_exactly(fail):
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1)).eval()
    model[1].train()  # a training flag that differs from the others
    own = model[2].forward  # a user's instance forward: put back, not deleted
    model[2].forward = own
    seen: list[int] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(1))
    before = _snapshot(model)
    x = torch.randn(1, 1, 6, 6, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="stop") if fail else _nothing():
        with checkpointed([model[0], model[2]]) as counter:
            assert "forward" in model[0].__dict__ and model[2].__dict__["forward"] is not own
            torch.autograd.grad(model(x).sum(), x)
            if fail:
                raise RuntimeError("stop")
    assert counter.calls == 2
    assert "forward" not in model[0].__dict__ and model[2].__dict__["forward"] is own
    _same(before, _snapshot(model))


@pytest.mark.parametrize("first_ends_first", [True, False])
def test_overlapping_runs_never_remove_each_others_wrappers(first_ends_first):
    """A run the watchdog abandoned may still unwind while the next one runs on the same model."""
    from esegeta_engine.errors import MethodError
    from esegeta_engine.forward.checkpointing import wrapped_blocks

    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 1, 3, padding=1)).eval()
    own = model[2].forward
    model[2].forward = own  # the user's own instance forward
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    g_plain, = torch.autograd.grad(model(x).sum(), x)
    a, b = checkpointed([model[0], model[2]]), checkpointed([model[0], model[2]])
    ca, cb = a.__enter__(), b.__enter__()
    (a if first_ends_first else b).__exit__(None, None, None)
    still = cb if first_ends_first else ca
    assert wrapped_blocks(model) == 2  # the run still going keeps its wrappers
    g, = torch.autograd.grad(model(x).sum(), x)
    assert still.calls == 2 and torch.equal(g, g_plain)
    with pytest.raises(MethodError, match="another run still has activation checkpointing"):
        with method_checkpointing(get_method("guided_backprop"), model, "on"):
            pass
    (b if first_ends_first else a).__exit__(None, None, None)
    assert wrapped_blocks(model) == 0
    assert "forward" not in model[0].__dict__ and model[2].__dict__["forward"] is own


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _unet(kind: str, dim: int) -> nn.Module:
    arch = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    common = dict(input_channels=1, n_stages=4, features_per_stage=[4, 8, 16, 16], conv_op=conv, kernel_sizes=3,
                  strides=[1, 2, 2, 2], num_classes=3, n_conv_per_stage_decoder=2, conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    torch.manual_seed(0)
    if kind == "plain":
        net = arch.PlainConvUNet(n_conv_per_stage=2, **common)
    else:
        net = arch.ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2, 2], **common)
    for p in net.parameters():  # affine norms start at 1/0: make every parameter matter
        p.data.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _outputs_and_gradient(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The network's output(s) and the gradient of a weighted sum of all of them (deep supervision too)."""
    xr = x.clone().requires_grad_(True)
    out = net(xr)
    outs = out if isinstance(out, (list, tuple)) else [out]
    gen = torch.Generator().manual_seed(3)
    total = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(total, xr)[0]


@pytest.mark.parametrize("deep_supervision", [False, True], ids=["one-head", "deep-supervision"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_unet_gradient_equals_the_plain_gradient(kind, dim, deep_supervision):
    net = _unet(kind, dim)
    net.decoder.deep_supervision = deep_supervision
    x = torch.randn(1, 1, *(16,) * dim)
    plain_out, plain = _outputs_and_gradient(net, x)
    segments = unet_segments(net)
    names = {m: n for n, m in net.named_modules()}
    stages = [names[m] for m in segments if type(m).__name__.startswith("Stacked")]
    blocks = [names[m] for m in segments if type(m).__name__ in ("ConvDropoutNormReLU", "BasicBlockD")]
    # the encoder's stages; the decoder as fused steps (its stages are inside them, not segments of their own);
    # the blocks of the levels whose feature maps are at least half the largest (channels / voxels per input
    # voxel): level 0 (4), in 2D also level 1 (8/4) -- except the last stage's first block, inside its step
    assert len(stages) == (5 if kind == "residual" else 4) and not any(n.startswith("decoder") for n in stages)
    assert names[segments[-1]] == "decoder"
    large = ("encoder.stem", "encoder.stages.0", "decoder.stages.2") + (
        ("encoder.stages.1", "decoder.stages.1") if dim == 2 else ())
    assert blocks and all(n.startswith(large) for n in blocks)
    assert "decoder.stages.2.convs.1" in blocks and "decoder.stages.2.convs.0" not in blocks
    before = _snapshot(net)
    with checkpointed(segments) as counter:
        assert "forward" in net.decoder.__dict__
        ours_out, ours = _outputs_and_gradient(net, x)
    # each outermost segment ran once with gradients: the encoder's stages, one step per decoder stage and the
    # last decoder stage's further blocks
    assert counter.calls == len(stages) + len(net.decoder.stages) + len(net.decoder.stages[-1].convs) - 1
    assert plain.abs().max() > 0 and len(ours_out) == (len(net.decoder.stages) if deep_supervision else 1)
    for a, b in zip(ours_out, plain_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    _same(before, _snapshot(net))


def _concatenations_saved(net: nn.Module, x: torch.Tensor, segments: list[nn.Module]) -> int:
    """Tensors the forward stores with the last decoder stage's input shape (skip + up-sampled: 2x channels)."""
    shape = (1, 2 * net.decoder.stages[-1].output_channels, *x.shape[2:])
    found = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        found.append(tuple(t.shape) == shape)
        return t

    with checkpointed(segments), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x.clone().requires_grad_(True))
    return sum(found)


class _OwnDecoder:
    """A subclass of nnU-Net's decoder (the fused loop is written for the exact class only)."""


@pytest.mark.parametrize("dim", [2, 3])
def test_fused_decoder_stores_no_concatenation_and_others_fall_back(dim):
    from esegeta_engine.forward.checkpointing import decoder_scheme

    net = _unet("plain", dim)
    x = torch.randn(1, 1, *(16,) * dim)
    segments = unet_segments(net)
    assert _concatenations_saved(net, x, []) >= 1  # without checkpointing the first block stores it
    assert _concatenations_saved(net, x, segments) == 0
    assert decoder_scheme(net, segments).startswith("fused steps")
    # a subclass, a decoder with its own forward: the per-stage scheme, and the record says why
    plain_out, plain = _outputs_and_gradient(net, x)
    cls = net.decoder.__class__
    net.decoder.__class__ = type("OwnDecoder", (cls,), {})
    try:
        fallback = unet_segments(net)
        assert net.decoder not in fallback and net.decoder.stages[0] in fallback
        assert "OwnDecoder is not dynamic_network_architectures" in decoder_scheme(net, fallback)
        assert _concatenations_saved(net, x, fallback) >= 1
        with checkpointed(fallback):
            out, g = _outputs_and_gradient(net, x)
        torch.testing.assert_close(g, plain, rtol=0, atol=0)
    finally:
        net.decoder.__class__ = cls
    own = net.decoder.forward
    net.decoder.forward = own
    fallback = unet_segments(net)
    assert net.decoder not in fallback and "its own instance forward" in decoder_scheme(net, fallback)
    with checkpointed(fallback):
        out, g = _outputs_and_gradient(net, x)
    assert net.decoder.__dict__["forward"] is own
    torch.testing.assert_close(g, plain, rtol=0, atol=0)
    torch.testing.assert_close(out[0], plain_out[0], rtol=0, atol=0)


@pytest.mark.parametrize("dim", [2, 3])
def test_a_hook_on_the_last_stages_convs_keeps_firing(dim):
    """Review finding: the fused steps call the last stage's blocks, so a hook on its ``convs`` Sequential
    (a Grad-CAM layer a user picked) never fired; such a decoder now keeps the per-stage scheme."""
    from esegeta_engine.forward.checkpointing import decoder_scheme

    net = _unet("plain", dim)
    x = torch.randn(1, 1, *(16,) * dim)
    fired = []
    handle = net.decoder.stages[-1].convs.register_forward_hook(lambda m, i, o: fired.append(o.shape))
    try:
        segments = unet_segments(net)
        assert net.decoder not in segments
        assert "convs has forward hooks" in decoder_scheme(net, segments)
        with checkpointed(segments):
            _outputs_and_gradient(net, x)
        assert len(fired) >= 1
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_fused_decoder_restored_after_an_error_and_with_overlapping_runs(kind):
    net = _unet(kind, 3)
    x = torch.randn(1, 1, 16, 16, 16)
    _, plain = _outputs_and_gradient(net, x)
    before = _snapshot(net)
    with pytest.raises(RuntimeError, match="stop"):
        with checkpointed(unet_segments(net)):
            xr = x.clone().requires_grad_(True)
            y = net(xr)
            raise RuntimeError("stop")
    del y
    _same(before, _snapshot(net))
    assert "forward" not in net.decoder.__dict__
    a, b = checkpointed(unet_segments(net)), checkpointed(unet_segments(net))
    a.__enter__()
    cb = b.__enter__()
    a.__exit__(None, None, None)  # the earlier run ends first; the later one's fused decoder still runs
    _, g = _outputs_and_gradient(net, x)
    assert cb.calls > 0
    torch.testing.assert_close(g, plain, rtol=0, atol=0)
    b.__exit__(None, None, None)
    _same(before, _snapshot(net))


def test_recomputable_is_the_methods_own_declaration():
    plain = {s.name for s in list_methods() if s.recomputable}
    assert {"saliency", "input_x_gradient", "integrated_gradients", "gradient_shap"} <= plain
    # module hooks would fire again on recomputation
    assert not plain & {"guided_backprop", "deconvolution", "deeplift", "lrp", "layer_gradcam", "fullgrad"}
    assert all(s.recomputable == (not s.needs_hooks) for s in list_methods())


def test_setting_resolution_and_refusal():
    net = _unet("plain", 2)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3))
    with method_checkpointing(get_method("saliency"), net, "auto") as use:  # auto: only models that name blocks
        assert "forward" not in net.encoder.stages[0].__dict__
    assert not use.used and use.why.startswith("off (auto")
    with method_checkpointing(get_method("guided_backprop"), net, "on") as use:
        pass
    assert not use.used and "hooks" in use.why
    with method_checkpointing(get_method("saliency"), net, "on") as use:
        xr = torch.randn(1, 1, 16, 16, requires_grad=True)
        torch.autograd.grad(net(xr).sum(), xr)
    assert use.used and 0 < use.describe()["checkpointed_block_calls"] < use.segments  # outermost blocks only
    with pytest.raises(ConfigError, match="knows no blocks"):
        with method_checkpointing(get_method("saliency"), plain, "on"):
            pass
    with torch.no_grad(), method_checkpointing(get_method("saliency"), net, "on") as use:
        net(torch.randn(1, 1, 16, 16))  # no gradients: nothing stored less, nothing said to be
    assert not use.used


# -- through the deployed nnU-Net pipeline -----------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(nnunet_folder):
    return nnunet_folder


@pytest.fixture(scope="module")
def folder_2d(nnunet_folder):
    import nnunet_setup as S

    return S.add_configuration(nnunet_folder, "2d", folds=(0,))


@pytest.mark.parametrize("dim", [3, 2])
def test_pipeline_saliency_equal_and_counts_unchanged(folder, folder_2d, dim):
    pytest.importorskip("nnunetv2")
    import nnunet_setup as S

    from esegeta_engine.config import ModelConfig
    from esegeta_engine.models import load_source

    if dim == 3:  # every mirrored copy (8) of several patches
        img, _ = S.scan((14, 11, 6), (0.9, 1.1, 2.5), seed=5)
        pipe = load_source(ModelConfig(nnunet=folder, folds=[0])).module
    else:  # 2d configuration: a patch per slice, mirrored
        img, _ = S.scan((16, 12, 2), (1.0, 1.0, 2.0), seed=5)
        pipe = load_source(ModelConfig(nnunet=folder_2d, folds=[0], configuration="2d")).module
    pipe.bind_volume(img.header.get_zooms()[:3])
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    expected = pipe.network_calls(x)

    def saliency(setting: str):
        pipe._last, pipe.ensemble._last = [], None  # no reused forward: both runs do the same work
        calls: list[int] = []
        pipe.bind_monitor(calls.append)
        with method_checkpointing(get_method("saliency"), pipe, setting) as use:
            xr = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(pipe(xr)[:, 1].sum(), xr)
        return g, dict(pipe.calls), use

    before = _snapshot(pipe.folds)  # the user's networks (the pipeline's own counters change by running)
    g_off, calls_off, off = saliency("off")
    g_on, calls_on, on = saliency("auto")
    assert not off.used and on.used and on.segments == len(pipe.checkpoint_segments())
    # recomputed blocks are not network evaluations: the counts are the plan's, with or without
    assert calls_on == calls_off == {"forward": expected, "backward": expected, "reused": 0}
    # the outermost segments ran checkpointed once per backward network call (the forward runs without gradients)
    names = {m: n for n, m in pipe.named_modules()}
    decoder = pipe.folds[0].decoder
    last = f"decoder.stages.{len(decoder.stages) - 1}."
    outer = [m for m in pipe.checkpoint_segments()  # the encoder's stages, the last decoder stage's further blocks
             if type(m).__name__.startswith("Stacked") or last in names.get(m, "")]
    assert not outer or not any(last in names.get(m, "") for m in outer)  # the last stage: in-place activated
    steps = (len(decoder.stages) - 1) * len(pipe.folds)  # the fused decoder: one step per stage but the last
    # and the preprocessing's gradient steps once per evaluation with gradients
    assert on.calls == expected * (len(outer) + steps) // len(pipe.folds) + 1
    assert g_off.abs().max() > 0  # the last stage's backward in another order: equal within float32 rounding
    assert float((g_on - g_off).abs().max() / g_off.abs().max()) <= 1e-5
    _same(before, _snapshot(pipe.folds))


def test_engine_records_checkpointing_and_maps_equal(folder, tmp_path):
    pytest.importorskip("nnunetv2")
    import nnunet_setup as S

    from esegeta_engine.config import parse_config
    from esegeta_engine.pipeline import run

    img, _ = S.scan((14, 11, 6), (0.9, 1.1, 2.5), seed=5)
    nib.save(img, tmp_path / "scan.nii.gz")
    out = {}
    for setting in ("auto", "off"):
        cfg = parse_config({
            "model": {"nnunet": str(folder), "folds": [0], "mirroring": False},
            "volumes": [str(tmp_path / "scan.nii.gz")], "target": {"classes": [1]},
            "execution": {"checkpointing": setting},
            "methods": [{"name": "saliency"}, {"name": "guided_backprop"}],
            "output": {"dir": str(tmp_path / setting)}}, base=tmp_path)
        result = run(cfg)
        assert result.status == "completed" and not result.failed
        manifest = json.loads(result.manifest_path.read_text())
        assert manifest["config"]["execution"]["checkpointing"] == setting
        out[setting] = {r["method"]: r for r in manifest["results"]}
        for rec in manifest["results"]:
            ex = rec["execution"]
            assert rec["expected_network_evaluations"] == ex["forward_network_calls"] + ex["reused_network_calls"]
    assert out["auto"]["saliency"]["execution"]["checkpointing"]["used"] is True
    assert out["auto"]["guided_backprop"]["execution"]["checkpointing"]["used"] is False  # hooks: never
    assert out["off"]["saliency"]["execution"]["checkpointing"]["used"] is False
    for method in ("saliency", "guided_backprop"):
        a, b = (nib.load(tmp_path / s / out[s][method]["file"]).get_fdata() for s in ("auto", "off"))
        assert np.abs(a).max() > 0  # saliency's last decoder stage in another order: float32 rounding
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max() if method == "saliency" else 0)
        assert out["auto"][method]["model_evaluations"] == out["off"][method]["model_evaluations"]
        assert (out["auto"][method]["execution"]["backward_network_calls"]
                == out["off"][method]["execution"]["backward_network_calls"])
