"""DeepLIFT with the input and the baseline as two passes (issue 20: memory and passes at a 96^3 patch).

Checked against Captum's DeepLift / DeepLiftShap (one batch of two) for every rule Captum has,
2D and 3D, including voxels where input and baseline agree (the rules' plain-gradient case), on
networks with a linear module between rule modules; where two rule modules follow each other
(ReLU -> MaxPool as in MONAI's BasicUNet, ReLU -> Sigmoid) Captum's tensor hooks hand the first
module the second's plain gradient and its map no longer adds up, so there the check is
completeness and the rescale chain written out by hand;
patch-wise against Captum's DeepLift through MONAI's sliding_window_inference on a network with
max pooling and in-place activations; and by counted patch evaluations: one patch to count module
calls, then the baseline's patches and one forward + backward of the input's, with the stitched
forward and F(x0) costing no further patch.
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import DeepLift, DeepLiftShap
from monai.inferers import sliding_window_inference
from torch import nn

from esegeta_engine.config import ExecutionConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer
from esegeta_engine.forward.scoring import EvaluationMonitor, ScoreModel
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.targets import RegionOfInterestTarget
from tiny_models import assert_untouched

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ACTS = {"relu": lambda: nn.ReLU(), "leaky_inplace": lambda: nn.LeakyReLU(0.1, inplace=True),
        "elu": lambda: nn.ELU(), "sigmoid": lambda: nn.Sigmoid(), "tanh": lambda: nn.Tanh(),
        "softplus": lambda: nn.Softplus()}
OVERLAP, SW = 0.25, 2


def _net(dims: int, act: str, softmax: bool = False, norm: str = "batch") -> nn.Module:
    torch.manual_seed(3)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    P = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
    N = {"batch": nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d,
         "instance": nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d}[norm]
    # a linear module between any two rule modules: Captum's hooks mis-chain adjacent ones (below)
    layers = [C(1, 4, 3, padding=1), N(4), ACTS[act](), C(4, 4, 1), P(2), C(4, 4, 3, padding=1), ACTS[act](),
              nn.Upsample(scale_factor=2), C(4, 2, 1)]
    if softmax:
        layers.append(nn.Softmax(dim=1))
    net = nn.Sequential(*layers).eval()
    if norm == "batch":
        layers[1].running_mean.uniform_(-0.5, 0.5)
        layers[1].running_var.uniform_(0.2, 3.0)
    return net


def _x(dims: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 1, *(12, 12)[:dims] if dims == 2 else (8, 8, 8),
                       generator=torch.Generator().manual_seed(seed)) + 0.3


def _run(name: str, net: nn.Module, x: torch.Tensor, **params):
    sm = ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))
    spec = get_method(name)
    ctx = MethodContext(sm, x, 1)
    sm.monitor.start(None)
    return attribute(spec, ctx, spec.resolve_params(params)), ctx, sm


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 rounding: a rescale ratio (f(a) - f(a0)) / (a - a0) with a close to a0
    rounds differently when the convolutions ran on a batch of two."""
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_whole_volume_equals_captums_batched_deeplift(dims: int, act: str) -> None:
    net = _net(dims, act)
    x = _x(dims)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ours, ctx, sm = _run("deeplift", net, x, baseline="zero")
    assert_untouched(net, before)
    assert sm.monitor.count == 2 == get_method("deeplift").cost(None, {})  # baseline pass, input pass
    ref = DeepLift(ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))).attribute(
        x, torch.zeros_like(x), target=1)
    _close(ours, ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


@pytest.mark.parametrize("dims", [2, 3])
def test_where_input_and_baseline_agree_the_plain_gradient_is_used_as_captum_does(dims: int) -> None:
    """Half the baseline equals the input: there ``a - a0`` is exactly 0 at the first rule modules."""
    net = _net(dims, "leaky_inplace")
    x = _x(dims)
    base = x.clone()
    base[..., : x.shape[-1] // 2] = 0.0
    sm = ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))
    spec = get_method("deeplift")
    ctx = MethodContext(sm, x, 1)
    ours = attribute(spec, ctx, spec.resolve_params({}))  # the zeros baseline first: the set-up runs
    from esegeta_engine.methods.deeplift_twopass import TwoPassDeepLift

    ours = TwoPassDeepLift(ctx, "deeplift").attribute(x, base, target=1)
    ref = DeepLift(ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))).attribute(x, base, target=1)
    _close(ours, ref)


@pytest.mark.parametrize("dims", [2, 3])
def test_softmax_rule_equals_captums(dims: int) -> None:
    net = _net(dims, "relu", softmax=True)
    x = _x(dims)
    ours, _, _ = _run("deeplift", net, x)
    ref = DeepLift(ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))).attribute(
        x, torch.zeros_like(x), target=1)
    _close(ours, ref)


@pytest.mark.parametrize("dims", [2, 3])
def test_deeplift_shap_equals_captums_and_counts_two_passes_per_row(dims: int) -> None:
    net = _net(dims, "elu")
    x = _x(dims)
    ours, ctx, sm = _run("deeplift_shap", net, x, n_baselines=3)
    assert sm.monitor.count == 6 == get_method("deeplift_shap").cost(None, {"n_baselines": 3})
    ref = DeepLiftShap(ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))).attribute(
        x, ctx.extra["baselines"], target=1)
    _close(ours, ref)


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_without_max_pooling_still_equals_captum(dims: int) -> None:
    """The two forms differ only at a max pool behind a module without a rule: without pooling they agree."""
    torch.manual_seed(4)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    N = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
    net = nn.Sequential(C(1, 4, 3, padding=1), N(4, affine=True), nn.ReLU(), C(4, 2, 1)).eval()
    x = _x(dims)
    ours, ctx, _ = _run("deeplift", net, x)
    assert any("InstanceNorm" in n for n in ctx.extra.get("notes", []))
    ref = DeepLift(ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))).attribute(
        x, torch.zeros_like(x), target=1)
    _close(ours, ref)


def _complete(net: nn.Module, x: torch.Tensor, ours: torch.Tensor) -> None:
    sm = ScoreModel(net, RegionOfInterestTarget(torch.ones(x.shape[2:])))
    with torch.no_grad():
        delta = float(sm(x)[0, 1].double() - sm(torch.zeros_like(x))[0, 1].double())
    assert float(ours.double().sum()) == pytest.approx(delta, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_adjacent_rule_modules_chain_their_multipliers(dims: int) -> None:
    """conv -> ReLU -> Sigmoid -> conv: the two rescale multipliers multiply to
    (g(z) - g(z0)) / (z - z0) of g = sigmoid(relu(.)); the map is (x - x0) times the gradient of the
    network with that multiplier in place of g, written out here."""
    torch.manual_seed(6)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    first, last = C(1, 4, 3, padding=1), C(4, 2, 1)
    net = nn.Sequential(first, nn.ReLU(), nn.Sigmoid(), last).eval()
    x = _x(dims)
    ours, _, _ = _run("deeplift", net, x)
    _complete(net, x, ours)
    target = RegionOfInterestTarget(torch.ones(x.shape[2:]))
    with torch.no_grad():
        z, z0 = first(x), first(torch.zeros_like(x))
        m = (torch.sigmoid(torch.relu(z)) - torch.sigmoid(torch.relu(z0))) / (z - z0)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(target(last(m * first(xr)))[:, 1].sum(), xr)
    _close(ours, x * g)


@pytest.mark.parametrize("dims", [2, 3])
def test_a_rectifier_feeding_a_max_pool_stays_complete(dims: int) -> None:
    """BasicUNet's pattern (activation, then the next block's max pool), in-place activation."""
    torch.manual_seed(7)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    P = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
    net = nn.Sequential(C(1, 4, 3, padding=1), nn.LeakyReLU(0.1, inplace=True), P(2), C(4, 4, 3, padding=1),
                        nn.ReLU(), nn.Upsample(scale_factor=2), C(4, 2, 1)).eval()
    x = _x(dims)
    ours, _, _ = _run("deeplift", net, x)
    _complete(net, x, ours)


# -- sliding window ------------------------------------------------------------------------------
CASES = [(2, (20, 14), (8, 8)), (3, (12, 10, 9), (8, 8, 8))]


def _setup(net: nn.Module, dims: int, shape: tuple, patch: tuple):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(2)) + 0.5
    expl = Explainer(net, PreprocessConfig(spatial_dims=dims), TargetConfig(),
                     execution=ExecutionConfig(mode="sliding_window", patch_size=list(patch), overlap=OVERLAP,
                                               sw_batch_size=SW))
    expl.raw_output(x)  # the prediction: its stitched output is remembered
    return x, expl, RegionOfInterestTarget(torch.ones(shape))


class _PairedMonai(nn.Module):
    """Captum's batch of (input; baseline) through MONAI's sliding window, each patch pair in one call."""

    def __init__(self, net: nn.Module, target: nn.Module, patch: tuple) -> None:
        super().__init__()
        self.net, self.target, self.patch = net, target, patch

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        n, c = inp.shape[0] // 2, inp.shape[1]

        def pair(z: torch.Tensor) -> torch.Tensor:
            y = self.net(torch.cat([z[:, :c], z[:, c:]]))
            return torch.cat([y[: z.shape[0]], y[z.shape[0]:]], dim=1)

        out = sliding_window_inference(torch.cat([inp[:n], inp[n:]], dim=1), self.patch, 10_000, pair,
                                       overlap=OVERLAP, mode="gaussian")
        k = out.shape[1] // 2
        return self.target(torch.cat([out[:, :k], out[:, k:]]))


def _f(net: nn.Module, target: nn.Module, patch: tuple, x: torch.Tensor) -> float:
    with torch.no_grad():
        out = sliding_window_inference(x, patch, SW, net, overlap=OVERLAP, mode="gaussian")
        return float(target(out)[0, 1].double())


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_with_max_pooling_equals_captum_through_monai_in_counted_passes(dims, shape, patch):
    net = _net(dims, "leaky_inplace")
    x, expl, target = _setup(net, dims, shape, patch)
    monitor = EvaluationMonitor()
    sm = expl.make_score_model(target, x, monitor)
    spec = get_method("deeplift")
    ctx = MethodContext(sm, x, 1, extra={"patchwise": True})
    ours = attribute(spec, ctx, spec.resolve_params({}))
    ref = DeepLift(_PairedMonai(net, target, patch)).attribute(x, torch.zeros_like(x), target=1)
    _close(ours, ref)
    patches = len(sm.runner.grid(x.shape[2:], x.device).slices)
    assert patches > 1
    # one patch counts module calls; then every baseline patch without a graph and every input patch
    # with one; the stitched forward is the prediction's and F(x0) is stitched from the backward's patches
    assert sm.runner.patch_evaluations == monitor.patches == 1 + 2 * patches
    assert monitor.count == 2 == spec.cost(None, {})
    f0 = float(ctx.extra["tapped_scores"][("baseline", 0)][1])
    assert f0 == pytest.approx(_f(net, target, patch, torch.zeros_like(x)), rel=1e-5, abs=1e-6)
    assert sm.runner.remembered_output(x) is not None  # the prediction is still there for the next method


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_deeplift_shap_equals_captum_and_reuses_the_input_forward(dims, shape, patch):
    net = _net(dims, "relu")
    x, expl, target = _setup(net, dims, shape, patch)
    monitor = EvaluationMonitor()
    sm = expl.make_score_model(target, x, monitor)
    spec = get_method("deeplift_shap")
    ctx = MethodContext(sm, x, 1, extra={"patchwise": True})
    ours = attribute(spec, ctx, spec.resolve_params({"n_baselines": 2}))
    base = ctx.extra["baselines"]
    ref = sum(DeepLift(_PairedMonai(net, target, patch)).attribute(x, base[j:j + 1], target=1)
              for j in range(2)) / 2
    _close(ours, ref)
    patches = len(sm.runner.grid(x.shape[2:], x.device).slices)
    assert sm.runner.patch_evaluations == 1 + 2 * 2 * patches
    assert monitor.count == 3 == spec.cost(type("Info", (), {"patchwise": True, "batch": 1})(), {"n_baselines": 2})


@pytest.mark.parametrize("dims,shape,patch", CASES)
def test_patchwise_deeplift_shap_under_a_support_runs_no_extra_stitched_pass(dims, shape, patch):
    """Where the window cannot cache (a support restricts the patches), each baseline's stitched output
    is still handed over from the backward's patches: planned evaluations == counted, and no patch
    runs beyond the input's stitched forward, the baselines' patches and the input's recomputation."""
    net = _net(dims, "relu")
    x, expl, _ = _setup(net, dims, shape, patch)
    support = torch.zeros(shape, dtype=torch.bool)
    support[tuple(slice(0, 3) for _ in shape)] = True
    target = RegionOfInterestTarget(support.float())  # it reads only the corner's patches
    monitor = EvaluationMonitor()
    sm = expl.make_score_model(target, x, monitor, support=support)
    spec = get_method("deeplift_shap")
    ctx = MethodContext(sm, x, 1, extra={"patchwise": True})
    ours = attribute(spec, ctx, spec.resolve_params({"n_baselines": 2}))
    grid = sm.runner.grid(x.shape[2:], x.device)
    active = len(sm.runner.active_patches(grid))
    assert 0 < active < len(grid.slices)
    assert sm.runner.remembered_output(x) is None  # a support: the window cannot cache
    # 1 patch counts module calls; the input's stitched forward; per row the baseline's and the input's patches
    assert sm.runner.patch_evaluations == monitor.patches == 1 + active + 2 * 2 * active
    assert monitor.count == 3 == spec.cost(type("Info", (), {"patchwise": True, "batch": 1})(), {"n_baselines": 2})
    base = ctx.extra["baselines"]
    for j in range(2):  # F(x0) of each row, as handed over, against MONAI's sliding window
        f0 = float(ctx.extra["tapped_scores"][("baseline", j)][1])
        assert f0 == pytest.approx(_f(net, target, patch, base[j:j + 1]), rel=1e-5, abs=1e-6)
    ref = sum(DeepLift(_PairedMonai(net, target, patch)).attribute(x, base[j:j + 1], target=1)
              for j in range(2)) / 2
    _close(ours, ref)


@pytest.mark.parametrize("kind", ["zero", "min", "mean"])
def test_constant_baselines_as_views_hold_no_scan_and_give_the_same_bits(kind):
    """DeepLIFT's constant baselines are a broadcast view of one value per input (no whole-scan buffer);
    whole volume and sliding window, the map is bitwise the one of the materialised baseline."""
    from esegeta_engine.methods._common import make_baseline
    from esegeta_engine.methods.deeplift_twopass import TwoPassDeepLift

    for dims, shape, patch in CASES:
        net = _net(dims, "leaky_inplace")
        x, expl, target = _setup(net, dims, shape, patch)
        whole = _x(dims)  # the sliding window's shapes are odd for the max pooling: a volume it can pool
        runs = [(whole, ScoreModel(net, RegionOfInterestTarget(torch.ones(whole.shape[2:])))),
                (x, expl.make_score_model(target, x, EvaluationMonitor()))]
        for inp, sm in runs:
            view = make_baseline(inp, kind, view=True)
            assert view.untyped_storage().nbytes() == 4 and torch.equal(view, make_baseline(inp, kind))
            maps = []
            for base in (make_baseline(inp, kind), view):
                ctx = MethodContext(sm, inp, 1, extra={"patchwise": getattr(sm, "patchwise", False)})
                maps.append(TwoPassDeepLift(ctx, "deeplift").attribute(inp, base, target=1))
            assert float(maps[0].abs().max()) > 0 and torch.equal(maps[0], maps[1])


@pytest.mark.parametrize("act", ["leaky_inplace", "relu", "elu", "sigmoid"])
def test_rescale_formed_in_place_gives_the_formula_bit_for_bit_and_frees_the_reference(act):
    """``(f(a) - f(a0)) / (a - a0)`` with ``f(a0)`` and the difference formed in the reference's memory
    (``-f(a0) + f(a)``): the same bits as the formula, signed zeros and plain-gradient voxels included; the
    reference's activation is taken out of the list handed in (freed once used)."""
    import weakref

    from esegeta_engine.methods.deeplift_rules import EPS, _rescale

    module = ACTS[act]()
    g = torch.Generator().manual_seed(7)
    a = torch.randn(2, 3, 5, 6, generator=g)
    a0 = torch.randn(2, 3, 5, 6, generator=g)
    a0[0, 0] = a[0, 0]  # input and reference agree: the local derivative
    a[0, 1, 0], a0[0, 1, 0] = 0.0, -0.0
    y = module.forward(a.clone())
    expected = (y - module.forward(a0.clone())) / (a - a0)
    expected = torch.where((a - a0).abs() < EPS, torch.autograd.functional.jacobian(
        lambda t: module.forward(t * 1.0).sum(), a).reshape(a.shape), expected)
    kept = [a0.clone()]
    ref = weakref.ref(kept[0])
    rule = _rescale(module, a, kept, y, EPS)
    assert kept == [] and ref() is None
    ones = torch.ones_like(a)
    assert torch.equal(rule(ones), expected)
