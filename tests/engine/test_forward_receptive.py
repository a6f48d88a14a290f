"""The linearised receptive-field probe (forward/receptive.py): a safe superset of the input voxels an
output region depends on, checked against brute-force perturbation of every input voxel, against the
analytic box of a plain convolution stack, on a network whose ReLUs are all dead on the probe's input
(where the plain gradient sees nothing), and refusing by name an operation it does not know."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esegeta_engine.forward.receptive import ReceptiveFieldUnknown, dependency


def _mods(dims: int):
    return ((nn.Conv2d, nn.MaxPool2d, nn.InstanceNorm2d) if dims == 2
            else (nn.Conv3d, nn.MaxPool3d, nn.InstanceNorm3d))


def _unet_like(dims: int) -> nn.Module:
    C, P, _ = _mods(dims)
    torch.manual_seed(0)
    return nn.Sequential(C(1, 3, 3, padding=1), nn.LeakyReLU(0.1), P(2), C(3, 3, 3, padding=1), nn.ReLU(),
                         nn.Upsample(scale_factor=2), C(3, 2, 3, padding=1)).eval()


def _brute_force(net: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Voxels whose change changes the output inside ``mask`` (on this input: a subset of the truth)."""
    n = x[0, 0].numel()
    with torch.no_grad():
        y0 = net(x)[0][:, mask]
        hit = torch.zeros(n, dtype=torch.bool)
        for start in range(0, n, 512):
            idx = torch.arange(start, min(start + 512, n))
            xp = x.repeat(len(idx), 1, *([1] * (x.dim() - 2))).flatten(2)
            xp[torch.arange(len(idx)), 0, idx] += 10.0
            y = net(xp.reshape(len(idx), *x.shape[1:]))[:, :, mask]
            hit[idx] = ((y - y0).abs() > 1e-4).flatten(1).any(1)  # batched kernels round differently
    return hit.reshape(x.shape[2:])


@pytest.mark.parametrize("dims,size", [(2, 14), (3, 14)])
def test_probe_covers_every_voxel_a_perturbation_can_reach(dims, size):
    net = _unet_like(dims)
    shape = (size,) * dims
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[(size // 2,) * dims] = True
    (reach,) = dependency(net, (1, 1, *shape), [mask])
    for seed in range(2):
        x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(seed))
        truth = _brute_force(net, x, mask)
        assert truth.any() and not bool((truth & ~reach).any())  # a superset: nothing that matters is left out
    assert not bool(reach.all())  # and a real restriction


@pytest.mark.parametrize("dims", [2, 3])
def test_probe_of_a_convolution_stack_is_the_analytic_box(dims):
    C, _, _ = _mods(dims)
    net = nn.Sequential(C(1, 2, 3, padding=1), C(2, 2, 5, padding=2), C(2, 1, 3, padding=1, dilation=1))
    shape = (15,) * dims
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[(7,) * dims] = True
    (reach,) = dependency(net, (1, 1, *shape), [mask])
    expected = torch.zeros(shape, dtype=torch.bool)
    expected[(slice(7 - 4, 7 + 5),) * dims] = True  # radius 1 + 2 + 1
    assert torch.equal(reach, expected)


@pytest.mark.parametrize("dims", [2, 3])
def test_dead_relus_do_not_shrink_the_bound(dims):
    C, _, _ = _mods(dims)
    net = nn.Sequential(C(1, 2, 3, padding=1), nn.ReLU(), C(2, 1, 3, padding=1))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every unit dead on ordinary inputs: the gradient is zero everywhere
    shape = (9,) * dims
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[(4,) * dims] = True
    x = torch.randn(1, 1, *shape, requires_grad=True)
    (g,) = torch.autograd.grad(net(x)[(0, 0, *(4,) * dims)], x)
    assert not g.any()
    (reach,) = dependency(net, (1, 1, *shape), [mask])
    assert int(reach.sum()) == 5 ** dims  # the structural receptive field, radius 2


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_makes_every_voxel_count(dims):
    C, _, N = _mods(dims)
    net = nn.Sequential(C(1, 2, 3, padding=1), N(2), C(2, 1, 1))
    shape = (10,) * dims
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[(0,) * dims] = True
    (reach,) = dependency(net, (1, 1, *shape), [mask])
    assert bool(reach.all())


def test_an_unknown_operation_is_named():
    class Gate(nn.Module):
        def forward(self, x):
            return torch.where(x > 0, x, torch.zeros_like(x))

    with pytest.raises(ReceptiveFieldUnknown, match="where|gt"):
        dependency(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), Gate()), (1, 1, 6, 6),
                   [torch.ones(6, 6, dtype=torch.bool)])
