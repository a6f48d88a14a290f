"""A layer's grid on the network input (models/member_grid.py) is derived without touching anything shared.

:func:`layer_places` runs a private meta-device copy of the network under a per-thread torch
function mode. The checks: another thread's forward (of the same network, or of another one) run
*while* the derivation is inside its forward gives the same output and the same number of module
calls as alone; the user's network keeps its hooks, parameters and instance attributes and none of
its hooks fires; the derived grid follows the module docstring's rules in 2D and 3D.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.forward.checkpointing import checkpointed
from esegeta_engine.models.member_grid import Place, Unknown, layer_places

WAIT = 60.0  # a bound on a handshake that otherwise cannot end: never reached when the code is right


class _Gate(nn.Module):
    """Passes its input on; in the deriving thread it waits until the other thread's forward is done.

    The events are class attributes, so a copy of the network shares them (and copies no lock).
    """

    inside = threading.Event()
    done = threading.Event()
    deriving: int | None = None
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() == _Gate.deriving:
            _Gate.calls += 1
            _Gate.inside.set()
            assert _Gate.done.wait(WAIT), "the other thread's forward never finished"
        return x


def _ops(nd: int) -> tuple[type, type]:
    return (nn.Conv3d, nn.ConvTranspose3d) if nd == 3 else (nn.Conv2d, nn.ConvTranspose2d)


def _net(nd: int) -> nn.Sequential:
    conv, _ = _ops(nd)
    torch.manual_seed(0)
    return nn.Sequential(conv(1, 4, 3, stride=2), _Gate(), nn.LeakyReLU(inplace=True), conv(4, 4, 3, stride=2),
                         nn.ReLU())


def _counting(net: nn.Module) -> list[int]:
    """One counter per module of ``net``, raised by a forward hook the test owns."""
    counts = [0] * len(list(net.modules()))
    for i, m in enumerate(net.modules()):
        m.register_forward_hook(lambda m, a, out, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("other", ["same network", "another network"])
def test_a_forward_in_another_thread_during_the_derivation_is_unaffected(nd, other):
    net = _net(nd)
    conv, _ = _ops(nd)
    torch.manual_seed(1)
    runs = net if other == "same network" else nn.Sequential(conv(1, 3, 3, padding=1), nn.ReLU(),
                                                             conv(3, 2, 3, stride=2))
    x = torch.randn((1, 1) + (17,) * nd)
    with torch.no_grad():
        expected = runs(x).clone()
    counts = _counting(runs)
    seen: dict[str, object] = {}

    def forward_meanwhile() -> None:
        try:
            assert _Gate.inside.wait(WAIT), "the derivation never reached the gate"
            with torch.no_grad():
                seen["out"] = runs(x)
        except BaseException as exc:  # reported by the main thread
            seen["error"] = exc
        finally:
            _Gate.done.set()

    _Gate.inside.clear(), _Gate.done.clear()
    _Gate.deriving, _Gate.calls = threading.get_ident(), 0
    thread = threading.Thread(target=forward_meanwhile)
    thread.start()
    try:
        places = layer_places(net, net[3], False, nd)
    finally:
        _Gate.deriving = None
        _Gate.done.set()
        thread.join(WAIT)
    assert not thread.is_alive()
    assert _Gate.calls == 1  # the other forward ran while the derivation was inside its forward
    assert "error" not in seen, seen.get("error")
    assert isinstance(seen["out"], torch.Tensor) and not seen["out"].is_meta
    torch.testing.assert_close(seen["out"], expected, rtol=0, atol=0)
    assert counts == [1] * len(counts)  # each module of the other forward once; none from the derivation
    # conv k3 s2 p0 twice: S = 4, c = 1 + 2 * 1 = 3
    assert places == {Place((4.0,) * nd, (3.0,) * nd)}


@pytest.mark.parametrize("nd", [2, 3])
def test_the_users_network_is_only_read(nd):
    net = _net(nd)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = [id(p) for p in net.parameters()]
    counts = _counting(net)
    hooks = [dict(m._forward_hooks) for m in net.modules()]
    attrs = [dict(m.__dict__) for m in net.modules()]
    with checkpointed([net[0], net[3]]):  # another run's checkpointing wrappers on the blocks meanwhile
        wrapped = [m.__dict__.get("forward") for m in net.modules()]
        assert layer_places(net, net[3], True, nd) == {Place((2.0,) * nd, (1.0,) * nd)}
        assert [m.__dict__.get("forward") for m in net.modules()] == wrapped
    assert counts == [0] * len(counts)  # no hook of the user's network fired
    assert [dict(m._forward_hooks) for m in net.modules()] == hooks
    assert [dict(m.__dict__) for m in net.modules()] == attrs
    assert [id(p) for p in net.parameters()] == params
    for k, v in net.state_dict().items():
        assert not v.is_meta and torch.equal(v, before[k])


class _Padded(nn.Module):
    """Pads two voxels before every axis, upsamples, concatenates a strided path, then does something
    with no known grid rule after the layer of interest."""

    def __init__(self, nd: int) -> None:
        super().__init__()
        conv, up = _ops(nd)
        self.nd = nd
        self.down = conv(1, 2, 3, stride=2, padding=1)
        self.up = up(2, 2, 2, stride=2)
        self.head = conv(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.pad(x, (2, 0) * self.nd)
        d = self.down(p)
        y = self.head(torch.cat([d, F.interpolate(self.up(d)[(...,) + (slice(None, None, 2),) * self.nd],
                                                  scale_factor=1)], 1))
        return torch.flip(y, (2,))  # unknown to the rules, but no layer asked for depends on it


@pytest.mark.parametrize("nd", [2, 3])
def test_grid_rules_padding_transposed_and_a_mixture(nd):
    net = _Padded(nd)
    # pad 2 before: c = -2; conv k3 s2 p1: S = 2, c = -2 + (1 - 1) = -2
    assert layer_places(net, net.down, False, nd) == {Place((2.0,) * nd, (-2.0,) * nd)}
    # transposed k2 s2 p0 on it: S = 1, c = -2 + 2 * (0 - 0.5) / 2 = -2.5
    assert layer_places(net, net.up, False, nd) == {Place((1.0,) * nd, (-2.5,) * nd)}
    with pytest.raises(Unknown, match="__getitem__|indexing"):  # every second cell: not a known rule here
        layer_places(net, net.head, False, nd)


@pytest.mark.parametrize("nd", [2, 3])
def test_a_concatenation_of_two_grids_is_a_mixture(nd):
    conv, up = _ops(nd)

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down, self.up, self.head = conv(1, 2, 3, stride=2, padding=1), up(2, 2, 2, stride=2), conv(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([x, self.up(self.down(x))], dim=1))

    net = Skip()
    assert layer_places(net, net.head, True, nd) == {Place((1.0,) * nd, (0.0,) * nd),
                                                     Place((1.0,) * nd, (-0.5,) * nd)}
    assert layer_places(net, net, True, nd) == {Place((1.0,) * nd, (0.0,) * nd)}


@pytest.mark.parametrize("nd", [2, 3])
def test_an_in_place_sum_after_the_layer_does_not_change_the_layers_grid(nd):
    """A residual block adds its shortcut into the layer's output tensor in place (``out += skip``):
    the layer's grid is the one its output had when the layer returned it."""
    conv, _ = _ops(nd)
    pool = nn.AvgPool3d if nd == 3 else nn.AvgPool2d

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.skip = conv(1, 2, 3, stride=2, padding=1), nn.Sequential(pool(2, 2), conv(1, 2, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.conv(x)
            out += self.skip(x)
            return out

    net = Block()
    assert layer_places(net, net.conv, False, nd) == {Place((2.0,) * nd, (0.0,) * nd)}
    assert layer_places(net, net.skip, False, nd) == {Place((2.0,) * nd, (0.5,) * nd)}
    assert layer_places(net, net, False, nd) == {Place((2.0,) * nd, (0.0,) * nd), Place((2.0,) * nd, (0.5,) * nd)}


@pytest.mark.parametrize("nd", [2, 3])
def test_assigning_a_grid_into_a_fresh_tensor_is_unknown_not_silently_the_others(nd):
    """Review finding: a hand-written up-sampling (``out = zeros(...)``, ``out[..., ::2] = x``) left ``out``
    without a grid, so a later sum took the other operand's grid alone and called the move exact."""
    conv, _ = _ops(nd)

    class HandUp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down, self.head = conv(1, 2, 3, stride=2, padding=1), conv(2, 2, 1)
            self.skip = conv(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            d = self.down(x)
            out = torch.zeros(d.shape[0], d.shape[1], *x.shape[2:], device=d.device, dtype=d.dtype)
            out[(...,) + (slice(None, None, 2),) * nd] = d
            return self.head(out + self.skip(x))

    net = HandUp()
    assert layer_places(net, net.skip, False, nd) == {Place((1.0,) * nd, (0.0,) * nd)}
    with pytest.raises(Unknown, match="assigning into a tensor"):
        layer_places(net, net.head, False, nd)
