"""The last decoder stage's in-place-activated backward (forward/checkpoint_opening.py).

References: plain autograd through nnU-Net's own ``dynamic_network_architectures`` U-Nets (no
checkpointing at all), and the previous checkpointed path (the last stage's opening recomputed in one
step), which the fallback still is; the model's state before the run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from esegeta_engine.forward import checkpoint_opening as opening_mod
from esegeta_engine.forward.checkpointing import checkpointed, decoder_scheme, unet_segments

pytest.importorskip("dynamic_network_architectures")
from test_forward_checkpointing import _outputs_and_gradient, _same, _snapshot, _unet  # noqa: E402


def _frozen(kind: str, dim: int) -> nn.Module:
    net = _unet(kind, dim)
    for p in net.parameters():  # as the engine's own copies of the user's networks are
        p.requires_grad_(False)
    return net


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class _Backward(TorchDispatchMode):
    """Counts, after ``armed`` is set, concatenations and forward convolutions that produce a tensor at
    the full resolution (the recomputation the in-place-activated backward no longer does)."""

    def __init__(self, spatial: tuple[int, ...]):
        super().__init__()
        self.spatial, self.armed, self.cats, self.convs = spatial, False, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.armed and isinstance(out, torch.Tensor) and tuple(out.shape[2:]) == self.spatial:
            self.cats += func is torch.ops.aten.cat.default
            self.convs += func is torch.ops.aten.convolution.default
        return out


def _run_counting(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, _Backward]:
    mode = _Backward(tuple(x.shape[2:]))
    with checkpointed(unet_segments(net)), mode:
        xr = x.clone().requires_grad_(True)
        total = net(xr).sum()
        mode.armed = True
        (g,) = torch.autograd.grad(total, xr)
    return g, mode


@pytest.mark.parametrize("deep_supervision", [False, True], ids=["one-head", "deep-supervision"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_outputs_identical_and_gradient_equal_within_rounding(kind, dim, deep_supervision, monkeypatch):
    net = _frozen(kind, dim)
    net.decoder.deep_supervision = deep_supervision
    x = torch.randn(1, 1, *(16,) * dim)
    plain_out, plain = _outputs_and_gradient(net, x)
    segments = unet_segments(net)
    assert not any(b in segments for b in net.decoder.stages[-1].convs)  # run by the decoder's loop itself
    assert "in-place activated" in decoder_scheme(net, segments)
    before = _snapshot(net)
    with checkpointed(segments):
        ours_out, ours = _outputs_and_gradient(net, x)
    _same(before, _snapshot(net))
    monkeypatch.setattr(opening_mod, "MAX_SHIFT", -1.0)  # the previous path: the opening recomputed in one step
    with checkpointed(unet_segments(net)):
        old_out, old = _outputs_and_gradient(net, x)
    for a, b, c in zip(ours_out, plain_out, old_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the forward runs the block's own modules
        torch.testing.assert_close(c, b, rtol=0, atol=0)
    torch.testing.assert_close(old, plain, rtol=0, atol=0)
    assert plain.abs().max() > 0 and _relative(ours, plain) <= 1e-5  # another order of the same derivative
    assert _relative(ours, old) <= 1e-5


@pytest.mark.parametrize("dim", [2, 3])
def test_backward_recomputes_nothing_at_full_resolution_and_saves_outputs_only(dim, monkeypatch):
    net = _frozen("plain", dim)
    x = torch.randn(1, 1, *(16,) * dim)
    _, ours = _run_counting(net, x)
    # the encoder's first stage is still recomputed (its first block twice: nested), the last decoder stage is not
    assert (ours.cats, ours.convs) == (0, 3)
    with monkeypatch.context() as m:
        m.setattr(opening_mod, "MAX_SHIFT", -1.0)
        _, old = _run_counting(net, x)
    # before: the concatenation, the up-sampling and both blocks' convolutions ran again in the backward
    assert (old.cats, old.convs) == (1, 3 + 1 + len(net.decoder.stages[-1].convs))

    saved: list[tuple[int, ...]] = []
    block = net.decoder.stages[-1].convs[0]
    out = {}
    handle = block.all_modules[2].register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    try:  # the opening on its own: it saves its output and one variance per channel, nothing else
        low = torch.randn(1, net.decoder.transpconvs[-1].in_channels, *(8,) * dim, requires_grad=True)
        skip = torch.randn(1, block.all_modules[0].in_channels // 2, *(16,) * dim, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = opening_mod.opening(net.decoder.transpconvs[-1], block, low, skip)
    finally:
        handle.remove()
    assert saved == [tuple(y.shape), (1, y.shape[1])]
    torch.testing.assert_close(y, out["y"], rtol=0, atol=0)


@pytest.mark.parametrize("dim", [2, 3])
def test_fallbacks_keep_the_recomputed_step_and_say_why(dim):
    net = _frozen("plain", dim)
    x = torch.randn(1, 1, *(16,) * dim)
    plain_out, plain = _outputs_and_gradient(net, x)
    conv0 = net.decoder.stages[-1].convs[0].all_modules[0]
    norm1 = net.decoder.stages[-1].convs[1].all_modules[1]

    def check(reason: str) -> None:
        _, reference = _outputs_and_gradient(net, x)  # plain autograd of the network as it now is
        segments = unet_segments(net)
        assert reason in decoder_scheme(net, segments)
        _, mode = _run_counting(net, x)
        assert mode.cats == 1  # the opening recomputed in one step, as before
        with checkpointed(segments):
            out, g = _outputs_and_gradient(net, x)
        torch.testing.assert_close(g, reference, rtol=0, atol=0)

    conv0.weight.requires_grad_(True)  # a parameter gradient wanted: the in-place backward gives none
    check("requires a gradient")
    conv0.weight.requires_grad_(False)
    fired = []
    handle = conv0.register_forward_hook(lambda m, i, o: fired.append(1))
    try:  # a hook on a module inside the stage (a user's layer) keeps firing
        check("has hooks")
        assert fired
    finally:
        handle.remove()
    shift = norm1.bias.data.clone()
    norm1.bias.data[0] = 100.0 * norm1.weight.data[0].abs()
    try:  # the normalised value could not be recovered to float32 rounding
        check("shift is 100x its scale")
    finally:
        norm1.bias.data.copy_(shift)
    act = net.decoder.stages[-1].convs[1].all_modules[2]
    net.decoder.stages[-1].convs[1].all_modules[2] = nn.ReLU()  # not the structure it was written for
    try:
        check("convolution -> InstanceNorm -> LeakyReLU")
    finally:
        net.decoder.stages[-1].convs[1].all_modules[2] = act
    for slope, inplace in ((0.0, True), (-0.2, False)):  # its input cannot be recovered from its output
        net.decoder.stages[-1].convs[1].all_modules[2] = nn.LeakyReLU(slope, inplace=inplace)
        try:  # before: NaN (0 / 0) at slope 0, a gradient wrong by 2.7x at -0.2
            check(f"slope is {slope:g}, not above 0")
        finally:
            net.decoder.stages[-1].convs[1].all_modules[2] = act
    padding = conv0.padding
    conv0.padding = "same"
    try:  # a padding by name: before, a TypeError in the backward
        check("pads by name")
    finally:
        conv0.padding = padding
    assert "in-place activated" in decoder_scheme(net, unet_segments(net))


@pytest.mark.parametrize("kind", ["plain", "residual"])
def test_model_restored_after_an_error(kind):
    net = _frozen(kind, 3)
    x = torch.randn(1, 1, 16, 16, 16)
    _, plain = _outputs_and_gradient(net, x)
    before = _snapshot(net)

    def fail(m, i, o):
        raise RuntimeError("stop")

    handle = net.decoder.seg_layers[-1].register_forward_hook(fail)  # after the last stage has run
    try:
        with pytest.raises(RuntimeError, match="stop"), checkpointed(unet_segments(net)):
            net(x.clone().requires_grad_(True))
    finally:
        handle.remove()
    _same(before, _snapshot(net))
    assert not any("forward" in m.__dict__ for m in net.modules())
    with checkpointed(unet_segments(net)):
        _, g = _outputs_and_gradient(net, x)
    assert _relative(g, plain) <= 1e-5
    _same(before, _snapshot(net))


def test_first_convolution_without_same_padding_on_every_axis():
    """A first convolution padded on one axis only: the up-sampled half's gradient is on the skip's grid (it
    was sized as the convolution's output and failed with a size mismatch)."""
    net = _frozen("plain", 2)
    conv0 = net.decoder.stages[-1].convs[0].all_modules[0]
    conv0.padding = (1, 0)
    x = torch.randn(1, 1, 16, 16)
    _, plain = _outputs_and_gradient(net, x)
    assert "in-place activated" in decoder_scheme(net, unet_segments(net))
    with checkpointed(unet_segments(net)):
        _, ours = _outputs_and_gradient(net, x)
    assert _relative(ours, plain) <= 1e-5


def test_autocast_keeps_the_recomputed_step():
    """Under bf16 autocast the saved output is bf16 while the weights stay float32: the in-place backward
    failed ('expected scalar type BFloat16') and would recover the normalised value at bf16's precision."""
    net = _frozen("plain", 2)
    x = torch.randn(1, 1, 16, 16)

    def grad() -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(xr)
        return torch.autograd.grad(out.float().sum(), xr)[0]

    plain = grad()
    with checkpointed(unet_segments(net)):
        ours = grad()
    assert _relative(ours, plain) <= 1e-2  # bf16 runs; the recomputed step repeats the same autocast ops


@pytest.mark.parametrize("dim", [2, 3])
def test_cancel_is_checked_inside_the_in_place_backward(dim, monkeypatch):
    """The in-place backward runs no module, so the run's Cancel check is called per channel from inside it
    (before, the whole full-resolution backward had no check)."""
    from esegeta_engine.forward.cancel_points import cancel_points

    net = _frozen("plain", dim)
    x = torch.randn(1, 1, *(16,) * dim)
    inside: list[int] = []
    real = opening_mod._norm_act_grad

    def spy(*args, **kwargs):
        inside.append(1)
        try:
            return real(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(opening_mod, "_norm_act_grad", spy)
    seen = []

    def check() -> None:
        if inside:
            seen.append(1)
            raise KeyboardInterrupt  # a Cancel: stops the backward where it is

    before = _snapshot(net)
    with checkpointed(unet_segments(net)), cancel_points(check):
        xr = x.clone().requires_grad_(True)
        total = net(xr).sum()
        with pytest.raises(KeyboardInterrupt):
            torch.autograd.grad(total, xr)
    assert seen == [1]
    _same(before, _snapshot(net))
