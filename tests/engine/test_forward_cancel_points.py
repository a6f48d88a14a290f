"""Cancel inside one model evaluation (issue 19, second pass): between the network's modules in the forward,
between leaf modules in the backward, within a patch batch, inside Captum's internal batches — counted on
the network (no clock), the user's model left as it was (no hooks, same parameters)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import Cancelled
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.forward.cancel_points import cancel_points
from esegeta_engine.forward.runner import ExecutionForm
from esegeta_engine.forward.scoring import EvaluationMonitor, make_score_model
from esegeta_engine.forward.sliding import WindowSettings
from esegeta_engine.io import Volume
from esegeta_engine.targets import ArgmaxRegionTarget

from tiny_models import assert_untouched, conv


class _Tap(torch.autograd.Function):
    """Identity; its backward logs ``name`` and may set the cancel (a click during the backward)."""

    @staticmethod
    def forward(ctx, x, tap):  # type: ignore[override]
        ctx.tap = tap
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        ctx.tap.log.append(ctx.tap.name)
        if ctx.tap.trip_backward:
            ctx.tap.cancel.set()
        return g, None


class Tap(nn.Module):
    def __init__(self, name: str, log: list[str], cancel: threading.Event) -> None:
        super().__init__()
        self.name, self.log, self.cancel = name, log, cancel
        self.trip_forward_at: int | None = None  # set the cancel during this forward call (1-based)
        self.trip_backward = False
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.trip_forward_at == self.calls:
            self.cancel.set()
        return _Tap.apply(x, self)


class Counted(nn.Module):
    """A convolution that counts the calls that reached its body."""

    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv(dims)(cin, cout, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x)


class TapNet(nn.Module):
    """conv1 -> tap a -> conv2 -> tap b -> head."""

    def __init__(self, dims: int, cancel: threading.Event) -> None:
        super().__init__()
        self.log: list[str] = []
        self.conv1, self.conv2, self.head = Counted(dims, 1, 4), Counted(dims, 4, 4), Counted(dims, 4, 2)
        self.a, self.b = Tap("a", self.log, cancel), Tap("b", self.log, cancel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.conv2(self.a(torch.relu(self.conv1(x)))))))


def _setup(dims: int, form: ExecutionForm | None = None):
    torch.manual_seed(0)
    cancel = threading.Event()
    net = TapNet(dims, cancel).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 1, *(8,) * dims)
    target = ArgmaxRegionTarget()
    with torch.no_grad():
        target.prepare(net(x))
    for m in (net.conv1, net.conv2, net.head, net.a, net.b):
        m.calls = 0
    sm = make_score_model(net, target, monitor=EvaluationMonitor(cancel), form=form)
    return net, state, x, sm, cancel


def _no_global_hook() -> bool:
    return not nn.modules.module._global_forward_pre_hooks


@pytest.mark.parametrize("dims", [2, 3])
def test_a_cancel_during_a_whole_volume_forward_stops_at_the_next_module(dims: int) -> None:
    net, state, x, sm, cancel = _setup(dims)
    net.a.trip_forward_at = 1
    with pytest.raises(Cancelled):
        sm(x)
    assert (net.conv1.calls, net.a.calls, net.conv2.calls, net.head.calls) == (1, 1, 0, 0)
    assert_untouched(net, state)
    assert _no_global_hook()


@pytest.mark.parametrize("dims", [2, 3])
def test_a_cancel_during_a_whole_volume_backward_stops_at_the_next_leaf_module(dims: int) -> None:
    net, state, x, sm, cancel = _setup(dims)
    xr = x.clone().requires_grad_(True)
    score = sm(xr)[0, 1]
    net.b.trip_backward = True
    with pytest.raises(Cancelled):
        torch.autograd.grad(score, xr)
    assert net.log == ["b"]  # tap a, below conv2, never saw its gradient (the old code logged ["b", "a"])
    assert_untouched(net, state)
    assert _no_global_hook()


@pytest.mark.parametrize("dims", [2, 3])
def test_a_cancel_within_one_patch_batch_stops_the_batch(dims: int) -> None:
    # 16^d in patches of 8 without overlap: 2^d patches, all in one batch
    form = ExecutionForm(sliding=WindowSettings((8,) * dims, 0.0, "constant", sw_batch_size=2 ** dims))
    net, state, x, sm, cancel = _setup(dims, form)
    x = torch.randn(1, 1, *(16,) * dims)
    net.a.trip_forward_at = 1
    with pytest.raises(Cancelled):
        sm(x)
    assert (net.conv1.calls, net.conv2.calls, net.head.calls) == (1, 0, 0)
    assert_untouched(net, state)


@pytest.mark.parametrize("dims", [2, 3])
def test_a_cancel_between_patch_batches_runs_no_further_patch(dims: int) -> None:
    form = ExecutionForm(sliding=WindowSettings((8,) * dims, 0.0, "constant", sw_batch_size=1))
    net, state, x, sm, cancel = _setup(dims, form)
    x = torch.randn(1, 1, *(16,) * dims)
    net.a.trip_forward_at = 2  # during the second patch of 2^d
    with pytest.raises(Cancelled):
        sm(x)
    assert (net.conv1.calls, net.conv2.calls, net.head.calls) == (2, 1, 1)


def test_a_replaced_monitor_moves_the_checks_inside_an_evaluation() -> None:
    """The randomisation replaces a score model's monitor after building it: the patch loop must
    watch the new one (it kept the first one's, so Cancel waited for a whole sliding window)."""
    form = ExecutionForm(sliding=WindowSettings((8, 8, 8), 0.0, "constant", sw_batch_size=1))
    net, state, x, sm, _ = _setup(3, form)
    other = threading.Event()
    sm.monitor = EvaluationMonitor(other)
    net.a.cancel = other
    net.a.trip_forward_at = 2
    with pytest.raises(Cancelled):
        sm(torch.randn(1, 1, 16, 16, 16))
    assert (net.conv1.calls, net.head.calls) == (2, 1)
    assert sm.monitor.patches == 2


@pytest.mark.parametrize("dims", [2, 3])
def test_integrated_gradients_stops_inside_its_internal_batches(dims: int) -> None:
    cancel = threading.Event()
    torch.manual_seed(0)
    net = TapNet(dims, cancel).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    vol = Volume(np.random.default_rng(0).random((10,) * dims).astype(np.float32), np.eye(4))
    explainer = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(classes=[1]))
    methods = [MethodConfig(name="saliency"),
               MethodConfig(name="integrated_gradients", params={"n_steps": 8, "internal_batch_size": 2})]
    events = []

    def run() -> None:
        for ev in explainer.iter_explain([vol], methods, cancel=cancel):
            events.append(ev)
            if isinstance(ev, MapReady):  # saliency is done: trip in IG's second internal batch
                net.a.calls, net.conv2.calls = 0, 0
                net.a.trip_forward_at = 2

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(120)
    assert not worker.is_alive()  # the worker ends
    assert [e.job.spec.name for e in events if isinstance(e, MapReady)] == ["saliency"]  # the finished map is kept
    assert net.a.calls == 2 and net.conv2.calls == 1  # no module after the click, no third batch
    assert_untouched(net, state)
    assert _no_global_hook()


def test_another_threads_evaluation_is_not_checked() -> None:
    inside, release = threading.Event(), threading.Event()

    def refuse() -> None:
        raise Cancelled("cancelled")

    def hold() -> None:
        with cancel_points(refuse):
            inside.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(30)
    try:
        net = nn.Sequential(nn.Conv3d(1, 2, 1), nn.ReLU())
        x = torch.randn(1, 1, 4, 4, 4, requires_grad=True)
        net(x).sum().backward()  # this thread opened no block: nothing raises
        assert x.grad is not None
    finally:
        release.set()
        t.join(30)
    assert _no_global_hook()


@pytest.mark.parametrize("dims", [2, 3])
def test_a_cancel_while_the_region_is_frozen_starts_no_method(monkeypatch, dims: int) -> None:
    """A click while the argmax region is frozen from the prediction (the stretch after the prediction pass,
    with no network module to check at): the method's first evaluation never runs; counted on the network."""
    cancel = threading.Event()
    calls: list[bool] = []

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv(dims)(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(torch.is_grad_enabled())
            return self.conv(x)

    freeze = ArgmaxRegionTarget.prepare

    def prepare(self, output):  # the click lands during the freeze
        freeze(self, output)
        cancel.set()

    monkeypatch.setattr(ArgmaxRegionTarget, "prepare", prepare)
    net = Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    vol = Volume(np.random.default_rng(0).random((12,) * dims).astype(np.float32), np.eye(4))
    ex = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(kind="argmax", classes=[1]))
    events = list(ex.iter_explain([vol], [MethodConfig(name="saliency")], cancel=cancel))
    assert calls == [False]  # the prediction pass only
    assert not any(isinstance(e, MapReady) for e in events)
    assert_untouched(net, before)
