"""The mirrored-copy offset on a strided layer, measured (docs/models.md states the numbers).

A mirrored copy's layer activation is flipped back on the layer's grid before it is placed
(:mod:`esegeta_engine.models.member_layer`). A strided layer samples the scan at ``S j`` (cumulative
stride ``S``, nnU-Net's kernel-3 / padding-1 / stride-2 convolutions); on the flipped copy, flipped
back, it samples ``S j + S - 1``. Measured on a flip-equivariant toy: an nnU-Net fold network built
from the test's plans whose every convolution kernel is made symmetric (the mean over its flips), fed
a single bright voxel. Flipping then commutes with the network up to that sampling, so the flipped-back
copy equals the unflipped copy of the voxel moved by ``d`` voxels: the shift found is the offset (up to
the scan's border, which the two sampling grids meet one voxel apart).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

pytest.importorskip("nnunetv2")

import nnunet_setup as S  # noqa: E402
from test_models_member_layer import _pipe  # noqa: E402


def _symmetric(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose convolution kernels equal their mirror images along every spatial axis."""
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                w = m.weight
                axes = list(range(2, w.dim()))
                flips = [c for i in range(len(axes) + 1) for c in itertools.combinations(axes, i)]
                m.weight.copy_(sum(torch.flip(w, c) if c else w for c in flips) / len(flips))
    return net


def _layer(net: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    h = dict(net.named_modules())[name].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            net(x)
    finally:
        h.remove()
    return seen[0]


def _strides(net: nn.Module, stage: int) -> list[int]:
    """Cumulative stride of ``encoder.stages.<stage>`` per spatial axis (product of its convolutions')."""
    out = None
    for i in range(stage + 1):
        for m in net.encoder.stages[i].modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                s = list(m.stride)
                out = s if out is None else [a * b for a, b in zip(out, s)]
    return out


def measure(net: nn.Module, stage: int, size: int = 32) -> list[tuple[int, int, float, float]]:
    """Per spatial axis: (cumulative stride, measured shift in voxels, relative error at it, at no shift)."""
    sym = _symmetric(net)
    name = f"encoder.stages.{stage}"
    nd = sum(isinstance(m, nn.Conv3d) for m in sym.modules()) and 3 or 2
    shape = (size,) * nd
    centre = tuple(s // 2 for s in shape)
    rows = []
    for axis, stride in enumerate(_strides(sym, stage)):
        def delta(shift: int) -> torch.Tensor:
            x = torch.zeros((1, 1, *shape))
            pos = list(centre)
            pos[axis] += shift
            x[(0, 0, *pos)] = 1.0
            return x

        ax = axis + 2
        flipped_back = torch.flip(_layer(sym, name, torch.flip(delta(0), (ax,))), (ax,))
        norm = float(flipped_back.norm())
        errors = {d: float((_layer(sym, name, delta(d)) - flipped_back).norm()) / norm
                  for d in range(-2 * stride, 2 * stride + 1)}
        best = min(errors, key=errors.get)
        rows.append((stride, best, errors[best], errors[0]))
    return rows


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_mirrored_copy_offset_on_strided_layers_is_stride_minus_one_voxels(nnunet_folder, configuration):
    folder = nnunet_folder if configuration == "3d_fullres" else S.add_configuration(nnunet_folder, "2d", folds=(0,))
    pipe = _pipe(folder, (1.0, 1.0, 2.0), folds=[0], configuration=configuration)
    net = pipe.folds[0]
    seen_strides = set()
    for stage in (0, 1, 2):
        if stage >= len(net.encoder.stages):
            break
        for stride, shift, err, err0 in measure(net, stage, 32 if configuration == "3d_fullres" else 96):
            print(f"{configuration} encoder.stages.{stage}: cumulative stride {stride}: flipped-back copy = "
                  f"unflipped copy moved {shift:+d} voxels (relative error {err:.1e}; unmoved {err0:.2f})")
            seen_strides.add(stride)
            # the flipped-back copy is a moved copy (the toy is flip-equivariant); what is left comes from the
            # scan's border, which the moved sampling grid meets one voxel apart (instance norm sees it all)
            assert err < 0.06
            assert abs(shift) == stride - 1  # S j + S - 1 vs S j
            if stride > 1:
                assert err0 > 10 * err  # without the move they differ (relative difference ~0.9)
    assert {1, 2} <= seen_strides
    if configuration == "3d_fullres":
        assert 4 in seen_strides
