"""The mirrored copy of a strided layer, moved back onto the unmirrored copy's cells (models/member_grid.py).

A strided layer samples the patch at ``S j`` (cumulative stride ``S``, nnU-Net's kernel-3 /
padding-1 / stride-2 convolutions); its mirrored copy, flipped back, samples ``S j + S - 1``.
The engine derives the move from the layer's geometry (:func:`layer_places`, :func:`mirror_move`)
and places the flipped-back copy's map moved by it (:meth:`LayerCanvas.add`). Checked on a
flip-equivariant toy: nnU-Net U-Nets (``PlainConvUNet``, 2D and 3D, strides 2 and 4) whose every
convolution kernel is made symmetric (the mean over its flips). Flipping then commutes with the
network up to the sampling, so the moved, flipped-back copy's map must equal the unmirrored copy's
up to (a) sampling: the copies sample the scene at different phases of the stride, so they agree
only as far as the scene is smooth at the stride (a Gaussian blob of sigma 2.5 S voxels here), and (b)
the patch's border (the two sampling grids meet the zero padding one voxel apart): compared 4 S voxels
inside it, with the toy's instance normalisation taken out (its whole-patch statistics would carry the
border into the interior; the real network with it is checked through the pipeline below). Bounds:
relative L2 difference < 1.5 % moved, and more than 8x that unmoved.
"""

from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("nnunetv2")

import nnunet_setup as S  # noqa: E402
from test_models_member_layer import _pipe  # noqa: E402

from esegeta_engine.forward.patch_layer import LayerCanvas  # noqa: E402
from esegeta_engine.models.member_grid import layer_places, mirror_move  # noqa: E402

TOLERANCE = 0.015


def _symmetric(net: nn.Module, without_norm: bool = False) -> nn.Module:
    """A copy of ``net`` whose convolution kernels equal their mirror images along every spatial axis."""
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                w = m.weight
                axes = list(range(2, w.dim()))
                flips = [c for i in range(len(axes) + 1) for c in itertools.combinations(axes, i)]
                m.weight.copy_(sum(torch.flip(w, c) if c else w for c in flips) / len(flips))
    if without_norm:  # instance normalisation's whole-patch statistics carry each copy's border into its interior
        for m in list(net.modules()):
            for name, child in list(m.named_children()):
                if isinstance(child, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                    setattr(m, name, nn.Identity())
    return net


def _layer(net: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    h = layer.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            net(x)
    finally:
        h.remove()
    return seen[0]


def _placed(a: torch.Tensor, shape: tuple[int, ...], move: tuple[int, ...] | None, combine: str) -> torch.Tensor:
    """One copy's map (the activation minus its patch mean, per channel) placed on a one-patch canvas."""
    grid = SimpleNamespace(roi=shape, slices=[tuple(slice(0, s) for s in shape)], padded=shape, spatial=shape,
                           offset=(0,) * len(shape), pad=[0] * len(shape), weight=torch.ones((1, 1, *shape)))
    canvas = LayerCanvas(grid, 1, combine)
    canvas.add([(0, 0)], a - a.mean(dim=tuple(range(2, a.dim())), keepdim=True), move)
    return canvas.result(torch.device("cpu"))[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _unet(nd: int) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if nd == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    torch.manual_seed(3)
    return PlainConvUNet(input_channels=1, n_stages=4, features_per_stage=(8, 16, 16, 16), conv_op=conv,
                         kernel_sizes=3, strides=(1, 2, 2, 2), n_conv_per_stage=2, num_classes=2,
                         n_conv_per_stage_decoder=(1, 1, 1), conv_bias=True, norm_op=norm,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True})


def _blob(shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    g = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) - s / 2 for s in shape], indexing="ij")
    return torch.exp(-sum(v ** 2 for v in g) / (2 * sigma ** 2))[None, None]


@pytest.mark.parametrize("nd", [3, 2])
def test_moved_mirrored_copy_equals_the_unmirrored_copy_on_strided_layers(nd):
    net = _symmetric(_unet(nd), without_norm=True)
    shape = (64,) * nd if nd == 3 else (96,) * nd
    for stage, stride in ((1, 2), (2, 4)):
        x = _blob(shape, 2.5 * stride)  # a scene smooth at the stride
        inner = (slice(None), *[slice(4 * stride, s - 4 * stride) for s in shape])  # away from the border
        layer = net.encoder.stages[stage]
        (place,) = layer_places(net, layer, False, nd)
        plain = _layer(net, layer, x)
        cells = tuple(plain.shape[2:])
        move = mirror_move({place}, shape, cells, f"encoder.stages.{stage}")
        assert move.inexact is None and place.stride == (stride,) * nd
        assert move.voxels == (stride - 1,) * nd  # S j + S - 1 vs S j
        for axes in [*[(k + 2,) for k in range(nd)], tuple(range(2, nd + 2))]:  # each axis, every axis
            back = torch.flip(_layer(net, layer, torch.flip(x, axes)), axes)
            d = tuple(v if k + 2 in axes else 0 for k, v in enumerate(move.voxels))
            for combine in ("blend", "sum"):
                ref = _placed(plain, shape, None, combine)
                ours, unmoved = _placed(back, shape, d, combine), _placed(back, shape, None, combine)
                err, err0 = _relative(ours[inner], ref[inner]), _relative(unmoved[inner], ref[inner])
                print(f"{nd}D stage {stage} stride {stride} axes {axes} {combine}: relative difference moved "
                      f"{err:.3f}, unmoved {err0:.3f}")
                assert err < TOLERANCE and err0 > 8 * err


def test_layers_on_several_grids_are_not_moved_and_say_why(nnunet_folder):
    pipe = _pipe(nnunet_folder, (1.0, 1.0, 2.0), folds=[0])
    net = pipe.folds[0]
    up = layer_places(net, net.decoder.transpconvs[0], False, 3)  # the bottleneck upsampled: one grid
    assert len(up) == 1
    mixed = layer_places(net, net.decoder.stages[0], False, 3)  # after the skip's concatenation: two grids
    assert len(mixed) == 2
    (s,) = {p.stride for p in mixed}
    move = mirror_move(mixed, (8, 12, 16), tuple(int(v / k) for v, k in zip((8, 12, 16), s)), "decoder.stages.0")
    assert move.voxels == (0, 0, 0) and "different grids" in move.inexact and "not moved" in move.inexact


def test_a_real_nnunet_pipeline_moves_each_mirrored_copy_by_its_layers_geometry(nnunet_folder):
    """Through the deployed pipeline (one fold of the test's nnU-Net model, its checkpoint's mirror axes, a
    scan whose network grid fits one patch): each mirrored member's layer map on the scan's grid equals
    the flipped-back copy written out here, upsampled, moved by ``S - 1`` voxels along the flipped
    strided axis (nearest-edge fill) and brought back as the probabilities are."""
    import numpy as np
    import torch.nn.functional as F

    from esegeta_engine.models import get_layer

    img, _ = S.scan((16, 12, 8), (1.0, 1.0, 2.0), seed=7)
    x = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    pipe = _pipe(nnunet_folder, (1.0, 1.0, 2.0), folds=[0])
    name = "folds.0.encoder.stages.1"
    layer = get_layer(pipe, name)
    net = pipe.folds[0]
    (place,) = layer_places(net, layer, False, 3)
    members = {m.ensemble.copies[0]: m for m in pipe.members("mirrors")}
    with torch.no_grad():
        info = pipe._prepare(x[0])
    plan = info["plan"]
    assert len(plan.slicers) == 1
    patch = plan.pad(info["data"])[plan.slicers[0]][None]
    size = tuple(patch.shape[2:])
    moved_axes = 0
    for k, stride in enumerate(place.stride):
        axes = (k + 2,)
        ours = members[axes].member_layer_forward(SimpleNamespace(monitor=None), layer, x, False,
                                                  lambda a, items: a.sum(1, keepdim=True), "blend",
                                                  "layer_activation", name)[0]
        a = torch.flip(_layer(net, layer, torch.flip(patch, axes)), axes).sum(1, keepdim=True)
        up = F.interpolate(a, size=size, mode="trilinear", align_corners=False)[0]
        d = int(stride) - 1
        idx = (torch.arange(size[k]) - d).clamp(0, size[k] - 1)
        ref = pipe._to_scan(up.index_select(k + 1, idx)[(slice(None), *plan.revert)], info, logits=False)
        unmoved = pipe._to_scan(up[(slice(None), *plan.revert)], info, logits=False)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        if d:
            assert float((unmoved - ref).abs().max()) > 1e-2 * float(ref.abs().max())
            moved_axes += 1
    assert moved_axes  # the test's plans stride stage 1 along at least one axis


def test_an_inexact_move_is_named_in_the_maps_notes(nnunet_folder, tmp_path):
    import json

    import nibabel as nib

    from esegeta_engine.config import parse_config
    from esegeta_engine.pipeline import run

    img, _ = S.scan((16, 12, 8), (1.0, 1.0, 2.0), seed=5)
    nib.save(img, tmp_path / "scan.nii.gz")
    cfg = parse_config({
        "model": {"nnunet": str(nnunet_folder), "folds": [0]}, "volumes": [str(tmp_path / "scan.nii.gz")],
        "target": {"classes": [1]},
        "methods": [{"name": "layer_activation", "layers": ["folds.0.decoder.stages.0"]},
                    {"name": "layer_activation", "layers": ["folds.0.encoder.stages.1"]}],
        "output": {"dir": str(tmp_path / "out")}}, base=tmp_path)
    manifest = json.loads(run(cfg).manifest_path.read_text())
    notes = {r["layer"]: " ".join(r.get("notes") or []) for r in manifest["results"] if r["status"] == "ok"}
    assert "layer 'folds.0.decoder.stages.0'" in notes["folds.0.decoder.stages.0"]
    assert "different grids" in notes["folds.0.decoder.stages.0"]
    assert "grid" not in notes["folds.0.encoder.stages.1"]  # exact: moved, nothing to say
