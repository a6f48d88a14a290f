"""Infidelity / max-sensitivity (against direct Captum calls) and map similarity."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam, Saliency
from captum.metrics import infidelity, sensitivity_max

from esegeta_engine.evaluation import (
    compare_maps,
    gaussian_perturbation,
    infidelity_score,
    sensitivity_score,
    spearman,
    ssim,
    topk_overlap,
    uniform_perturbation,
)
from esegeta_engine.evaluation.metrics import LAYER_SENSITIVITY_NOTE
from esegeta_engine.methods import Call, MethodContext, MethodSpec, attribute, get_method
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget, ClassificationTarget
from tiny_models import TinyClassifier, TinySegNet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add overhead, and on a busy machine
    # spinning OpenMP workers make each step up to 100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def seg(dims: int, n: int = 1, size: int = 8) -> tuple[TinySegNet, torch.Tensor, ScoreModel]:
    torch.manual_seed(1)
    net = TinySegNet(dims).eval()
    x = torch.randn(n, 1, *(size,) * dims)
    with torch.no_grad():  # shift the head so that both classes are predicted
        out = net(x)
        net.head.bias[1] -= (out[:, 1] - out[:, 0]).median()
        target = ArgmaxRegionTarget()
        target.prepare(net(x))
    return net, x, ScoreModel(net, target)


def clf(dims: int = 2) -> tuple[TinyClassifier, torch.Tensor, ScoreModel]:
    torch.manual_seed(2)
    net = TinyClassifier(dims).eval()
    return net, torch.randn(1, 1, *(8,) * dims), ScoreModel(net, ClassificationTarget())


# ---------------------------------------------------------------- infidelity


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("chunk", [None, 4])
def test_infidelity_equals_direct_captum_call(dims: int, chunk: int | None) -> None:
    _, x, sm = seg(dims)
    attr = Saliency(sm).attribute(x, target=1, abs=False)
    ours = infidelity_score(sm, x, attr, 1, n_perturb_samples=8, noise_scale=0.1, seed=5,
                            max_examples_per_batch=chunk)
    direct = infidelity(sm, gaussian_perturbation(0.1, 5), x, attr, target=1, n_perturb_samples=8,
                        max_examples_per_batch=chunk, normalize=True)
    assert isinstance(ours, float)
    assert ours == pytest.approx(float(direct.mean()), rel=1e-6, abs=1e-12)


def test_infidelity_uses_the_target() -> None:
    _, x, sm = clf()
    attr = Saliency(sm).attribute(x, target=1, abs=False)
    values = {t: infidelity_score(sm, x, attr, t, normalize=False, seed=0) for t in (0, 1, 2)}
    for t, v in values.items():
        direct = infidelity(sm, gaussian_perturbation(0.05, 0), x, attr, target=t,
                            n_perturb_samples=16, normalize=False)
        assert v == pytest.approx(float(direct), rel=1e-6)
    assert len({round(v, 12) for v in values.values()}) == 3
    # the map of target 1 explains target 1 best
    assert values[1] < values[0] and values[1] < values[2]


def test_infidelity_is_seeded_and_leaves_global_rng_alone() -> None:
    _, x, sm = clf()
    attr = Saliency(sm).attribute(x, target=0)
    state = torch.get_rng_state()
    a = infidelity_score(sm, x, attr, 0, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert a == infidelity_score(sm, x, attr, 0, seed=3) != infidelity_score(sm, x, attr, 0, seed=4)


def test_infidelity_batch_of_two_with_frozen_regions() -> None:
    # Captum repeats each example in a row; frozen targets tile per step. A wrong
    # order would score example 0's copies with example 1's region (huge error).
    _, xb, smb = seg(2, n=2)
    attr = Saliency(smb).attribute(xb, target=1)
    batch = infidelity_score(smb, xb, attr, 1, normalize=False, noise_scale=0.01)
    singles = []
    for i in range(2):
        model, xs, sm = seg(2, n=2)
        with torch.no_grad():
            sm.target.prepare(model(xs[i:i + 1]))  # the region of example i alone
        singles.append(infidelity_score(sm, xb[i:i + 1], attr[i:i + 1], 1, normalize=False,
                                        noise_scale=0.01))
    assert batch < 10 * max(singles)
    scale = float(smb(xb)[:, 1].pow(2).mean())
    assert batch < 1e-3 * scale


def test_infidelity_constant_and_channel_maps() -> None:
    _, x, sm = seg(3)
    assert math.isfinite(infidelity_score(sm, x, torch.zeros_like(x), 1))
    assert math.isfinite(infidelity_score(sm, x, torch.ones(x.shape[0], *x.shape[2:]), 1))
    assert math.isnan(infidelity_score(sm, x, torch.full_like(x, float("nan")), 1))


def test_infidelity_counts_one_clean_evaluation() -> None:
    _, x, sm = seg(2)
    sm.monitor.start(None)
    infidelity_score(sm, x, torch.ones_like(x), 1, n_perturb_samples=8, max_examples_per_batch=2)
    assert sm.monitor.samples == 8 + 1 and sm.monitor.count == 4 + 1


# ---------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("dims", [2, 3])
def test_sensitivity_equals_direct_captum_call(dims: int) -> None:
    _, x, sm = seg(dims)
    ctx = MethodContext(sm, x, 1)
    notes: list[str] = []
    ours = sensitivity_score(get_method("saliency"), ctx, {"abs": True}, n_perturb_samples=6,
                             perturb_radius=0.05, seed=7, max_examples_per_batch=3, notes=notes)

    def explain(inp: torch.Tensor, target: int) -> torch.Tensor:
        return Saliency(sm).attribute(inp, target=target, abs=True)

    direct = sensitivity_max(explain, x, uniform_perturbation(7), perturb_radius=0.05,
                             n_perturb_samples=6, max_examples_per_batch=3, target=1)
    assert ours == pytest.approx(float(direct.mean()), rel=1e-6, abs=1e-12)
    assert notes == []


def test_sensitivity_layer_method_on_upsampled_map() -> None:
    net, x, sm = seg(2)
    ctx = MethodContext(sm, x, 1, layer=net.conv2, layer_name="conv2")
    notes: list[str] = []
    ours = sensitivity_score(get_method("layer_gradcam"), ctx, {}, n_perturb_samples=4, seed=1,
                             notes=notes)

    def explain(inp: torch.Tensor | tuple[torch.Tensor], target: int) -> object:
        # Captum passes the clean input as a 1-tuple and iterates over the result:
        # a layer method (tensor out) must hand a tuple back or the batch axis is iterated.
        m = LayerGradCam(sm, net.conv2).attribute(inp, target=target, relu_attributions=True)
        m = LayerAttribution.interpolate(m, tuple(x.shape[2:]), "bilinear")
        return (m,) if isinstance(inp, tuple) else m

    direct = sensitivity_max(explain, x, uniform_perturbation(1), n_perturb_samples=4, target=1)
    assert ours == pytest.approx(float(direct.mean()), rel=1e-5, abs=1e-9)
    assert notes == [LAYER_SENSITIVITY_NOTE]


def test_sensitivity_batch_and_constant_map() -> None:
    _, xb, smb = seg(2, n=2)
    value = sensitivity_score(get_method("saliency"), MethodContext(smb, xb, 1), {},
                              n_perturb_samples=3)
    assert math.isfinite(value) and value < 0.4  # ~0.19; ~0.6 if copies met the wrong region

    class Zeros:
        def attribute(self, inputs: torch.Tensor, target: int | None = None) -> torch.Tensor:
            return torch.zeros_like(inputs)

    zeros = MethodSpec("zeros", "gradient", "Zeros", "test", (), lambda c, p: Call(Zeros()))
    assert sensitivity_score(zeros, MethodContext(smb, xb, 1), {}, n_perturb_samples=2) == 0.0


# ---------------------------------------------------------------- similarity


@pytest.mark.parametrize("shape", [(12, 12), (9, 10, 11), (5, 6, 3)])
def test_identical_maps(shape: tuple[int, ...]) -> None:
    a = np.random.default_rng(0).normal(size=shape)
    assert compare_maps(a, a) == {"spearman_abs": 1.0, "spearman_signed": 1.0, "ssim": 1.0,
                                  "topk_iou": 1.0}
    assert ssim(torch.as_tensor(a), torch.as_tensor(a)) == pytest.approx(1.0)


def test_constant_maps_give_nan() -> None:
    a = np.random.default_rng(0).normal(size=(8, 8, 8))
    c = np.zeros_like(a)
    s = compare_maps(a, c)
    assert math.isnan(s["spearman_abs"]) and math.isnan(s["spearman_signed"])
    assert math.isnan(s["topk_iou"]) and math.isfinite(s["ssim"])
    assert all(math.isnan(v) for v in compare_maps(c, c).values())
    assert math.isnan(spearman(a, a * np.nan, absolute=True))
    assert math.isnan(ssim(np.ones((2, 8)), np.zeros((2, 8))))  # too small for any window


def test_random_maps_are_dissimilar() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 16, 16, 16))
    s = compare_maps(a, b)
    assert abs(s["spearman_abs"]) < 0.05 and abs(s["spearman_signed"]) < 0.05
    assert abs(s["ssim"]) < 0.1 and s["topk_iou"] < 0.1
    assert spearman(a, -a, absolute=False) == pytest.approx(-1.0)
    assert spearman(a, -a, absolute=True) == pytest.approx(1.0)


def test_topk_overlap() -> None:
    a = np.arange(100, dtype=float)
    b = a.copy()
    b[-5:] = 0  # top 10: 5 shared out of 15 distinct
    assert topk_overlap(a, b, k=0.1) == pytest.approx(5 / 15)
    with pytest.raises(ValueError):
        topk_overlap(a, b, k=0)
    with pytest.raises(ValueError):
        compare_maps(a, a[:50])


def test_metrics_agree_with_attribute_for_a_registered_method() -> None:
    _, x, sm = seg(3)
    spec = get_method("input_x_gradient")
    attr = attribute(spec, MethodContext(sm, x, 1), spec.resolve_params({}))
    assert math.isfinite(infidelity_score(sm, x, attr, 1, n_perturb_samples=4))
