"""CAM family and FullGrad: the 2D/3D matrix, costs, and independent checks (FullGrad's own in
test_methods_fullgrad.py).

References: MONAI's ``monai.visualize`` (CAM, GradCAM, GradCAMpp) and torchcam's
``torchcam.methods`` (ScoreCAM, XGradCAM, LayerCAM) on copies of the same score
model and layer; scikit-learn's PCA for Eigen-CAM; defining identities for
HiResCAM and Ablation-CAM.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodContext, attribute, get_method, list_methods
from esegeta_engine.methods.registry import CostInfo
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget, ClassificationTarget
from extra_models import BiasNet
from tiny_models import TinyClassifier, assert_untouched, cls_setup, seg_setup, shape

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GRADIENT_CAMS = ("gradcam_pp", "xgradcam", "layercam", "hirescam")
CAMS = GRADIENT_CAMS + ("eigen_cam", "eigen_grad_cam", "score_cam", "ablation_cam")
RAW = {"upsample": False}


def setup(kind: str, dims: int) -> tuple[nn.Module, torch.Tensor, ScoreModel, int]:
    net, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    target = 1 if kind == "segmentation" else int(score(x).argmax(dim=1))
    return net, x, score, target


def run(name: str, score: nn.Module, x: torch.Tensor, layer: nn.Module | None, target: int = 1,
        layer_name: str | None = None, **params) -> torch.Tensor:
    spec = get_method(name)
    ctx = MethodContext(score, x, target, layer=layer, layer_name=layer_name)
    return attribute(spec, ctx, spec.resolve_params(params))


def hooked(score: nn.Module, layer: nn.Module, x: torch.Tensor,
           target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output and the gradient of the summed target score there (plain autograd)."""
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, a, out: store.__setitem__("a", out))
    try:
        s = score(x)[:, target].sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(s, store["a"])
    return store["a"].detach(), grad


def reference(net: nn.Module, score: ScoreModel, layer: nn.Module) -> tuple[ScoreModel, str]:
    """A copy of the score model for a reference library (MONAI leaves its hooks on the model),
    and the dotted name of ``layer``'s copy in it (whatever wraps the model inside)."""
    copied = copy.deepcopy(net)
    ref = ScoreModel(copied, copy.deepcopy(score.target))
    local = next(name for name, m in net.named_modules() if m is layer)
    outer = next(name for name, m in ref.named_modules() if m is copied)
    return ref, f"{outer}.{local}"


# --- matrix, registry, cost ---------------------------------------------------------------------


def _signed(name: str) -> dict:
    return {"relu_attributions": False} if "relu_attributions" in {
        p.name for p in get_method(name).params} else {}


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", CAMS + ("fullgrad",))
def test_method_matrix_and_cost(name: str, dims: int, kind: str) -> None:
    net, x, score, target = setup(kind, dims)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = {**_signed(name), **({"batch_size": 3} if name in ("score_cam", "ablation_cam") else {})}
    spec = get_method(name)
    score.monitor.start(None)
    result = run(name, score, x, None if name == "fullgrad" else net.conv2, target=target, **params)
    assert result.shape == (1, 1, *shape(dims))
    assert result.dtype == torch.float32
    assert bool(torch.isfinite(result).all())
    assert bool(result.abs().sum() > 0), "all-zero map"
    assert_untouched(net, state)
    info = CostInfo(batch=1, channels=1, spatial=shape(dims), layer_channels=net.conv2.out_channels)
    assert spec.cost is not None
    assert spec.cost(info, spec.resolve_params(params)) == score.monitor.count


def test_registered_specs() -> None:
    layer_specs = {s.name: s for s in list_methods("layer")}
    for name in CAMS:
        spec = layer_specs[name]
        assert spec.needs_layer and spec.needs_hooks
        # gradient CAMs run on every patch copy of the layer, Eigen/Score/Ablation-CAM on the stitched layer
        stitched = "eigen" in name or name in ("score_cam", "ablation_cam")
        assert spec.patchwise == ("stitched_layer" if stitched else "gradient")
        assert spec.reference and spec.summary and all(p.help for p in spec.params)
        assert {"upsample", "attribute_to_layer_input"} <= {p.name for p in spec.params}
        spec.resolve_params({})
    fullgrad = get_method("fullgrad")
    assert fullgrad.family == "gradient" and fullgrad.needs_hooks and not fullgrad.needs_layer


@pytest.mark.parametrize("name", ["score_cam", "ablation_cam"])
def test_channel_cost_follows_the_cap(name: str) -> None:
    net, x, score = cls_setup(2)  # conv2: 6 channels
    spec = get_method(name)
    info = CostInfo(batch=1, channels=1, spatial=shape(2), layer_channels=6)
    for cap, bs, expected in ((0, 4, 1 + 2), (2, 4, 1 + 1), (5, 2, 1 + 3), (9, 1, 1 + 6)):
        params = spec.resolve_params({"max_channels": cap, "batch_size": bs})
        score.monitor.start(None)
        run(name, score, x, net.conv2, target=0, max_channels=cap, batch_size=bs)
        assert spec.cost(info, params) == expected == score.monitor.count
    for cap in (0, 4):  # without the layer's channels the cost is unknown, even with a cap
        with pytest.raises(MethodError, match="layer_channels"):
            spec.cost(CostInfo(batch=1, channels=1, spatial=shape(2)), spec.resolve_params({"max_channels": cap}))


# --- MONAI: CAM, Grad-CAM, Grad-CAM++ -------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcam_pp_equals_monai_where_the_definitions_coincide(dims: int) -> None:
    """On a GAP + linear classifier the layer gradient is constant per channel, where MONAI's
    sum_ij A g^3 equals the paper's (sum_ij A) g^3; MONAI also explains exp(score)."""
    from monai.visualize import GradCAMpp

    net, x, score = cls_setup(dims)
    t = int(score(x).argmax(1))
    with torch.no_grad():  # large gradients (MONAI adds 1e-7 to the denominator), a score near 0
        net.fc.weight *= 100
        net.fc.bias[t] -= score(x)[0, t]
    ours = run("gradcam_pp", score, x, net.relu2, target=t, **RAW)
    ref, name = reference(net, score, net.relu2)
    theirs = GradCAMpp(nn_module=ref, target_layers=name).compute_map(x, class_idx=t)
    s = score(x)[0, t].detach()
    assert bool(ours.abs().sum() > 0)
    assert abs(float(s)) < 1e-3
    torch.testing.assert_close(ours * torch.exp(s), theirs, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcam_pp_is_the_paper_formula_and_finite_on_region_sums(dims: int) -> None:
    net, x, score = seg_setup(dims)
    with torch.no_grad():
        net.head.weight *= 200  # a region-sum score far beyond exp()'s range
    a, g = hooked(score, net.conv2, x, 1)
    assert abs(float(score(x)[0, 1])) > 100  # exp() of it over- or underflows
    g3_sum = g.pow(3) * a.flatten(2).sum(-1)[..., None, None] if dims == 2 else \
        g.pow(3) * a.flatten(2).sum(-1)[..., None, None, None]
    den = 2 * g.pow(2) + g3_sum
    alpha = torch.where(den != 0, g.pow(2) / torch.where(den != 0, den, 1.0), 0.0)
    w = (alpha * g.clamp(min=0)).flatten(2).sum(-1)
    manual = (w.reshape(*w.shape, *([1] * dims)) * a).sum(1, keepdim=True).clamp(min=0)
    ours = run("gradcam_pp", score, x, net.conv2, **RAW)
    assert bool(torch.isfinite(ours).all()) and bool(ours.abs().sum() > 0)
    torch.testing.assert_close(ours, manual, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_layer_gradcam_equals_monai_gradcam(dims: int) -> None:
    from monai.visualize import GradCAM

    net, x, score = seg_setup(dims)
    ref, name = reference(net, score, net.conv2)
    theirs = GradCAM(nn_module=ref, target_layers=name).compute_map(x, class_idx=1)
    ours = run("layer_gradcam", score, x, net.conv2, **RAW)
    assert bool(ours.abs().sum() > 0)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_layer_gradcam_is_monai_cam_on_a_pooled_classifier(dims: int) -> None:
    """CAM (Zhou et al. 2016) = fc weights x activations; Grad-CAM gives the same up to 1/voxels."""
    from monai.visualize import CAM

    net, x, score = cls_setup(dims)
    t = int(score(x).argmax(1))
    ref, name = reference(net, score, net.relu2)
    fc = name.rsplit(".", 1)[0] + ".fc"
    theirs = CAM(nn_module=ref, target_layers=name, fc_layers=fc).compute_map(x, class_idx=torch.tensor([t]))
    ours = run("layer_gradcam", score, x, net.relu2, target=t, relu_attributions=False, **RAW)
    voxels = math.prod(shape(dims))
    torch.testing.assert_close(ours * voxels + net.fc.bias[t].detach(), theirs, rtol=1e-4, atol=1e-5)


# --- torchcam: Score-CAM, XGrad-CAM, LayerCAM -----------------------------------------------------


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_score_cam_softmax_equals_torchcam(dims: int, kind: str) -> None:
    from torchcam.methods import ScoreCAM

    net, x, score, t = setup(kind, dims)
    ref, name = reference(net, score, net.conv2)
    with ScoreCAM(ref, name, batch_size=3, input_shape=tuple(x.shape[1:])) as extractor:
        with torch.no_grad():
            ref(x)
        theirs = extractor(class_idx=t, normalized=False)[0]
    ours = run("score_cam", score, x, net.conv2, target=t, weighting="softmax", batch_size=2, **RAW)
    assert bool(ours.abs().sum() > 0)
    torch.testing.assert_close(ours[:, 0], theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["xgradcam", "layercam"])
@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_gradient_cams_equal_torchcam(method: str, dims: int, kind: str) -> None:
    from torchcam.methods import LayerCAM, XGradCAM

    net, x, score, t = setup(kind, dims)
    t = 0 if kind == "segmentation" else t  # class 1's 2D XGrad-CAM is all negative (ReLU'd to 0)
    ref, name = reference(net, score, net.relu2)
    cls = XGradCAM if method == "xgradcam" else LayerCAM
    with cls(ref, name, input_shape=tuple(x.shape[1:])) as extractor:
        theirs = extractor(class_idx=t, scores=ref(x), normalized=False)[0]
    ours = run(method, score, x, net.relu2, target=t, **RAW)
    assert bool(ours.abs().sum() > 0)
    torch.testing.assert_close(ours[:, 0], theirs, rtol=1e-4, atol=1e-6)


# --- identities -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_hirescam_is_gradient_times_activation_summed_over_channels(dims: int, kind: str) -> None:
    net, x, score, t = setup(kind, dims)
    a, g = hooked(score, net.conv2, x, t)
    manual = (a * g).sum(1, keepdim=True)
    assert bool(manual.abs().sum() > 0)
    torch.testing.assert_close(run("hirescam", score, x, net.conv2, target=t, relu_attributions=False,
                                   **RAW), manual)
    torch.testing.assert_close(run("hirescam", score, x, net.conv2, target=t, **RAW), manual.clamp(min=0))


@pytest.mark.parametrize("name", ["eigen_cam", "eigen_grad_cam"])
@pytest.mark.parametrize("dims", [2, 3])
def test_eigen_cams_equal_sklearn_pca_with_a_fixed_sign(name: str, dims: int) -> None:
    from sklearn.decomposition import PCA

    net, x, score = seg_setup(dims)
    a, g = hooked(score, net.conv2, x, 1)
    analysed = a if name == "eigen_cam" else a * g
    rows = analysed[0].reshape(analysed.shape[1], -1).T.double().numpy()
    pca = torch.from_numpy(PCA(n_components=1).fit_transform(rows)[:, 0]).float()
    ours = run(name, score, x, net.conv2, **RAW).flatten()
    sign = float(torch.sign((ours * pca).sum()))
    torch.testing.assert_close(ours, sign * pca, rtol=1e-4, atol=1e-5)
    centred_sum = torch.from_numpy(rows.sum(1) - rows.sum(1).mean()).float()
    assert float((ours * centred_sum).sum()) >= 0  # the deterministic sign


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
def test_ablation_cam_on_a_score_linear_in_the_layer(dims: int, kind: str) -> None:
    """Classifier at relu2 (pool + fc follow): y - y_k = w_k mean(A_k); segmentation head (1x1 conv):
    y - y_k = sum over the region of w_k A_k."""
    net, x, score, t = setup(kind, dims)
    layer = net.relu2
    a, _ = hooked(score, layer, x, t)
    y = score(x)[0, t].detach()
    if kind == "classification":
        drop = net.fc.weight[t].detach() * a.flatten(2).mean(-1)[0]
    else:
        region = score.target.onehot[:, t:t + 1]
        drop = net.head.weight[t].detach().flatten() * (a * region).flatten(2).sum(-1)[0]
    w = drop / y.abs()
    manual = (w.reshape(1, -1, *([1] * dims)) * a).sum(1, keepdim=True)
    ours = run("ablation_cam", score, x, layer, target=t, relu_attributions=False, batch_size=4, **RAW)
    torch.testing.assert_close(ours, manual, rtol=1e-4, atol=1e-5)


def test_score_cam_increase_weights_are_score_gains_over_the_baseline() -> None:
    net, x, score = seg_setup(2)
    a, _ = hooked(score, net.conv2, x, 1)
    with torch.no_grad():
        base = score(torch.zeros_like(x))[0, 1]
        weights = []
        for k in range(a.shape[1]):
            m = a[:, k:k + 1]
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            weights.append(score(x * m)[0, 1] - base)  # layer grid = input grid here
    manual = (torch.stack(weights).reshape(1, -1, 1, 1) * a).sum(1, keepdim=True)
    torch.testing.assert_close(run("score_cam", score, x, net.conv2, relu_attributions=False, **RAW),
                               manual, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["score_cam", "ablation_cam"])
def test_batched_channel_methods_do_not_depend_on_batching(name: str) -> None:
    torch.manual_seed(3)
    net = TinySegNetPair()
    x = torch.randn(2, 1, *shape(3))
    target = ArgmaxRegionTarget()
    target.prepare(net(x).detach())
    score = ScoreModel(net, target)
    together = run(name, score, x, net.conv2, batch_size=3, relu_attributions=False, **RAW)
    for i in range(2):
        t_i = ArgmaxRegionTarget()
        t_i.prepare(net(x[i:i + 1]).detach())
        alone = run(name, ScoreModel(net, t_i), x[i:i + 1], net.conv2, batch_size=1,
                    relu_attributions=False, **RAW)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-5)


def TinySegNetPair() -> nn.Module:  # noqa: N802 - a factory named like the class it builds
    from tiny_models import TinySegNet

    return TinySegNet(3).eval()


def test_channel_cap_keeps_the_most_varying_channels() -> None:
    net, x, score = cls_setup(2)
    a, _ = hooked(score, net.conv2, x, 0)
    full = run("ablation_cam", score, x, net.conv2, target=0, max_channels=6, relu_attributions=False, **RAW)
    torch.testing.assert_close(full, run("ablation_cam", score, x, net.conv2, target=0,
                                         relu_attributions=False, **RAW))
    capped = run("ablation_cam", score, x, net.conv2, target=0, max_channels=1, relu_attributions=False,
                 **RAW)
    k = int(a.flatten(2).var(-1).argmax())
    ratio = capped / a[:, k:k + 1]
    finite = ratio[torch.isfinite(ratio) & (a[:, k:k + 1].abs() > 1e-6)]
    assert finite.numel() > 0 and torch.allclose(finite, finite[0].expand_as(finite), rtol=1e-4)


@pytest.mark.parametrize("name", ["hirescam", "score_cam", "ablation_cam", "eigen_cam"])
def test_layer_input_is_the_previous_modules_output(name: str) -> None:
    net, x, score = seg_setup(3)
    signed = {**RAW, **_signed(name)}
    via_input = run(name, score, x, net.conv2, attribute_to_layer_input=True, **signed)
    torch.testing.assert_close(via_input, run(name, score, x, net.relu1, **signed))
    assert not torch.allclose(via_input, run(name, score, x, net.conv2, **signed))


@pytest.mark.parametrize("dims", [2, 3])
def test_in_place_activations_after_the_layer_do_not_change_its_map(dims: int) -> None:
    """BiasNet's ReLU(inplace=True) overwrites the BatchNorm output: the CAM must use the values
    and gradients before it, as on a copy with an out-of-place ReLU."""
    torch.manual_seed(5)
    net = BiasNet(dims).eval()
    x = torch.randn(1, 1, *shape(dims))
    plain = copy.deepcopy(net)
    plain.relu1.inplace = False
    a, g = hooked(ScoreModel(plain, ClassificationTarget()), plain.bn, x, 0)
    assert bool((a < 0).any()), "the in-place ReLU would change this activation"
    ours = run("hirescam", ScoreModel(net, ClassificationTarget()), x, net.bn, target=0,
               relu_attributions=False, **RAW)
    torch.testing.assert_close(ours, (a * g).sum(1, keepdim=True))


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAMS)
def test_cam_on_a_layer_without_a_spatial_grid(name: str) -> None:
    net, x, score = cls_setup(2)
    with pytest.raises(MethodError, match="spatial grid") as err:
        run(name, score, x, net.fc, target=0, layer_name="fc")
    assert "'fc'" in err.value.problem and "convolutional layer" in str(err.value.fix)


class Reuses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x)))).flatten(1)


@pytest.mark.parametrize("name", ["gradcam_pp", "score_cam", "eigen_cam"])
def test_cam_on_a_module_that_runs_twice(name: str) -> None:
    net = Reuses().eval()
    score = ScoreModel(net, ClassificationTarget())
    with pytest.raises(MethodError, match="runs 2 times"):
        run(name, score, torch.randn(1, 1, *shape(2)), net.act, target=0, layer_name="act")


@pytest.mark.parametrize("name, params", [("score_cam", {"batch_size": 0}),
                                          ("score_cam", {"weighting": "mean"}),
                                          ("ablation_cam", {"max_channels": -1}),
                                          ("fullgrad", {"postprocess": "abs"})])
def test_out_of_range_parameters(name: str, params: dict) -> None:
    (param,) = params
    with pytest.raises(MethodError, match=param):
        get_method(name).resolve_params(params)


def test_cams_refuse_torchscript() -> None:
    net = torch.jit.script(TinyClassifier(2).eval())
    score = ScoreModel(net, ClassificationTarget())
    spec = get_method("gradcam_pp")
    ctx = MethodContext(score, torch.randn(1, 1, *shape(2)), 0, layer=net.conv2, torchscript=True)
    with pytest.raises(MethodError, match="state dict"):
        attribute(spec, ctx, spec.resolve_params({}))
