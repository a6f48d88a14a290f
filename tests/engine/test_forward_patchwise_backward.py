"""Patch-wise DeepLIFT with a linear target holds no whole-scan output-sized buffer in its backward
(forward/patchwise_backward.py; issue 20: DeepLIFT within 4 GB on the full 448x448x128 grid).

Where the target is fixed weights of the stitched output (the frozen argmax region, an ROI mask), each
patch's upstream is read from the labels or the mask, and F(x0) is summed patch by patch: neither the
stitched output's gradient nor the baseline's stitched output is made. Checked: the map is bit-identical
to the autograd path through the stitched output (the fallback every other target takes), F(x0) equals
MONAI's sliding_window_inference within float rounding, completeness holds against F(x) - F(x0) computed
by MONAI, and allocations of an output's size are counted (the old path makes three more).
"""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import esegeta_engine.methods.deeplift_twopass as twopass
from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.forward.patchwise_backward import linear_weights
from esegeta_engine.forward.scoring import EvaluationMonitor
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.targets import ArgmaxRegionTarget, OtsuThresholdTarget, RegionOfInterestTarget

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
OVERLAP, SW = 0.25, 2
# the last two: a volume thinner than the patch on one axis (the window pads it, the weights are 0 there)
CASES = [(2, (20, 14), (8, 8)), (3, (12, 10, 9), (8, 8, 8)), (2, (6, 19), (8, 8)), (3, (5, 12, 10), (8, 8, 8))]


def _net(dims: int) -> nn.Module:
    torch.manual_seed(4)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(C(1, 4, 3, padding=1), nn.LeakyReLU(0.1, inplace=True), C(4, 4, 3, padding=1),
                         nn.ReLU(), C(4, 2, 1)).eval()


def _target(kind: str, shape: tuple):
    if kind == "argmax":
        return ArgmaxRegionTarget()
    mask = torch.zeros(shape)
    mask[tuple(slice(1, s - 1) for s in shape)] = 1
    return RegionOfInterestTarget(mask)


def _run(net, dims, shape, patch, target, linear: bool, monkeypatch=None, watch=None):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(2)) + 0.5
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(mode="sliding_window", patch_size=list(patch), overlap=OVERLAP,
                                               sw_batch_size=SW))
    out = expl.raw_output(x)  # the prediction: remembered
    if isinstance(target, ArgmaxRegionTarget):
        target.prepare(out)
    if not linear and monkeypatch is not None:
        monkeypatch.setattr(twopass, "linear_weights", lambda t: None)
    monitor = EvaluationMonitor()
    sm = expl.make_score_model(target, x, monitor)
    spec = get_method("deeplift")
    ctx = MethodContext(sm, x, 1, extra={"patchwise": True})
    try:
        if watch is not None:
            with watch:
                result = attribute(spec, ctx, spec.resolve_params({}))
        else:
            result = attribute(spec, ctx, spec.resolve_params({}))
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    return x, result, ctx, monitor


def _monai_f(net, target, patch, x) -> float:
    with torch.no_grad():
        return float(target(sliding_window_inference(x, patch, SW, net, overlap=OVERLAP, mode="gaussian"))[0, 1]
                     .double())


@pytest.mark.parametrize("kind", ["argmax", "roi"])
@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_linear_target_gives_the_autograd_paths_map_bit_for_bit_and_monais_f_of_the_baseline(
        dims, shape, patch, kind, monkeypatch):
    net = _net(dims)
    x, fast, ctx, monitor = _run(net, dims, shape, patch, _target(kind, shape), linear=True)
    _, slow, ctx_slow, monitor_slow = _run(net, dims, shape, patch, _target(kind, shape), linear=False,
                                           monkeypatch=monkeypatch)
    assert float(fast.abs().max()) > 0 and torch.equal(fast, slow)
    assert (monitor.count, monitor.patches) == (monitor_slow.count, monitor_slow.patches)
    target = ctx.score_model.target
    f_x = float(ctx.extra["tapped_scores"][("input", 0)][1])
    f_0 = float(ctx.extra["tapped_scores"][("baseline", 0)][1])
    f_0_slow = float(ctx_slow.extra["tapped_scores"][("baseline", 0)][1])
    assert f_0 == pytest.approx(f_0_slow, rel=1e-6, abs=1e-6)  # the same sum in another order
    assert f_x == pytest.approx(_monai_f(net, target, patch, x), rel=1e-6, abs=1e-6)
    assert f_0 == pytest.approx(_monai_f(net, target, patch, torch.zeros_like(x)), rel=1e-5, abs=1e-6)
    delta = _monai_f(net, target, patch, x) - _monai_f(net, target, patch, torch.zeros_like(x))
    assert float(fast.double().sum()) == pytest.approx(delta, rel=1e-4, abs=1e-5)  # completeness (no norms)


class _Allocations(TorchDispatchMode):
    """Counts float results of at least ``nbytes`` in memory of their own (not a view or alias of an argument)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes, self.found = nbytes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in given \
                    and t.untyped_storage().nbytes() >= self.nbytes:
                self.found.append(str(func))
        return out


@pytest.mark.parametrize("dims,shape,patch", [(2, (40, 30), (8, 8)), (3, (24, 20, 18), (8, 8, 8))])
def test_no_output_sized_buffer_beyond_the_score_of_the_prediction(dims, shape, patch, monkeypatch):
    """A whole output (2 channels: twice the input's size) is made only where the target scores the
    prediction's remembered output (its copy and the masked product); the stitched output's gradient and
    the baseline's stitched output are never allocated (the autograd path makes them, and scores the
    handed-over baseline output through a copy and a product: 4 more)."""
    net = _net(dims)
    whole = 2 * 4 * torch.Size(shape).numel()
    counts = {}
    for linear in (True, False):
        mode = _Allocations(whole)
        _run(net, dims, shape, patch, ArgmaxRegionTarget(), linear=linear, monkeypatch=monkeypatch, watch=mode)
        counts[linear] = mode.found
    assert len(counts[True]) == 2, counts[True]
    assert len(counts[False]) == 2 + 4, counts[False]


def test_which_targets_are_linear():
    shape = (6, 6)
    frozen = ArgmaxRegionTarget()
    assert linear_weights(frozen) is None  # nothing frozen yet
    frozen.prepare(torch.randn(1, 3, *shape))
    assert linear_weights(frozen) is not None
    assert linear_weights(ArgmaxRegionTarget(activation="softmax")) is None
    assert linear_weights(RegionOfInterestTarget(torch.ones(shape))) is not None
    assert linear_weights(RegionOfInterestTarget(torch.ones(shape), activation="sigmoid")) is None
    assert linear_weights(OtsuThresholdTarget()) is None
    m = linear_weights(frozen)((0), (slice(1, 4), slice(0, 2)), 3)
    assert m.shape == (1, 3, 3, 2) and torch.equal(m.sum(1), torch.ones(1, 3, 2))
