"""Feature visualisation methods (2D and 3D): what each optimisation achieves, cost, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.errors import MethodError
from esegeta_engine.methods import MethodContext, attribute, get_method, list_methods
from esegeta_engine.methods._featvis import TrainableVolume, frequency_scale, total_variation
from esegeta_engine.methods.featvis import inversion_loss
from esegeta_engine.methods.registry import CostInfo
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ClassificationTarget
from tiny_models import assert_untouched, cls_setup, conv, seg_setup, shape

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

METHODS = ("activation_maximisation", "layer_visualisation", "deep_dream", "inverted_representation")


def run(name: str, score: ScoreModel, x: torch.Tensor, layer: nn.Module, seed: int = 0,
        **params) -> torch.Tensor:
    spec = get_method(name)
    ctx = MethodContext(score, x, 0, layer=layer, layer_name="conv2", seed=seed)
    score.monitor.start(None)
    return attribute(spec, ctx, spec.resolve_params(params))


def activation(net: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for ``x``, read with a hook of the test's own."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            net(x)
    finally:
        handle.remove()
    return seen[0]


def start_noise(x: torch.Tensor, seed: int, std: float = 0.1) -> torch.Tensor:
    """The seeded noise the methods start from (the first draw of their generator)."""
    return torch.randn(tuple(x.shape), generator=torch.Generator().manual_seed(seed)) * std


# --- the matrix: shape, cost, model untouched ---------------------------------------------


@pytest.mark.parametrize("kind", ["segmentation", "classification"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", METHODS)
def test_method_matrix(name: str, dims: int, kind: str) -> None:
    net, x, score = (seg_setup if kind == "segmentation" else cls_setup)(dims)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    spec = get_method(name)
    params = spec.resolve_params({"steps": 3})
    result = run(name, score, x, net.conv2, steps=3)
    # one volume per layer channel (default: up to 8) for layer_visualisation, else the input's
    channels = min(8, net.conv2.out_channels) if name == "layer_visualisation" else 1
    assert result.shape == (1, channels, *shape(dims))
    assert result.dtype == torch.float32 and bool(torch.isfinite(result).all())
    assert bool(result.abs().sum() > 0)
    info = CostInfo(batch=1, channels=1, spatial=shape(dims))
    assert spec.cost is not None and spec.cost(info, params) == score.monitor.count
    assert_untouched(net, state)
    assert not any(p.grad is not None for p in net.parameters()), "gradients left on the model"


def test_registered_specs() -> None:
    specs = {s.name: s for s in list_methods("visualisation")}
    assert set(specs) == set(METHODS)
    for spec in specs.values():
        assert spec.needs_layer and spec.needs_hooks and spec.patchwise == "patch_field_of_view"
        assert not spec.noise_tunnel and spec.reference and spec.summary
        assert all(p.help for p in spec.params)
        spec.resolve_params({})
    assert [s.family for s in list_methods()][-len(METHODS):] == ["visualisation"] * len(METHODS)
    from typing import get_args

    from esegeta_engine.cli import FAMILIES
    from esegeta_engine.methods.registry import Family

    assert FAMILIES == list(get_args(Family))  # `esegeta methods --family` offers every family


def test_seeded_and_global_rng_untouched() -> None:
    net, x, score = seg_setup(2)
    before = torch.get_rng_state()
    first = run("activation_maximisation", score, x, net.conv2, seed=3, steps=4)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(run("activation_maximisation", score, x, net.conv2, seed=3, steps=4), first)
    assert not torch.equal(run("activation_maximisation", score, x, net.conv2, seed=4, steps=4), first)


# --- what each method achieves ------------------------------------------------------------


class Detectors(nn.Module):
    """Known filters, then ReLU: channel 0 sees bright voxels, 1 dark ones, 2 edges along axis 0."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.conv = conv(dims)(1, 3, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.head = conv(dims)(3, 2, 1)
        w = torch.zeros(3, 1, *(3,) * dims)
        centre = (1,) * dims
        w[0, 0][centre], w[1, 0][centre], w[2, 0][centre] = 1.0, -1.0, 1.0
        w[2, 0][(0, *centre[1:])] = -1.0
        with torch.no_grad():
            self.conv.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)))


def detectors(dims: int) -> tuple[Detectors, torch.Tensor, ScoreModel]:
    torch.manual_seed(0)
    net = Detectors(dims).eval()
    return net, torch.randn(1, 1, *shape(dims)), ScoreModel(net, ClassificationTarget())


def relu_means(net: Detectors, x: torch.Tensor) -> torch.Tensor:
    """Mean activation of each channel of ``net.relu`` for each volume in ``x``: ``(B, 3)``."""
    return activation(net, net.relu, x).flatten(2).mean(dim=2)


@pytest.mark.parametrize("parameterisation", ["fourier", "pixel"])
@pytest.mark.parametrize("dims", [2, 3])
def test_activation_maximisation_raises_its_channel(dims: int, parameterisation: str) -> None:
    net, x, score = detectors(dims)
    made = torch.cat([run("activation_maximisation", score, x, net.relu, channel=k, steps=30,
                          parameterisation=parameterisation, seed=2) for k in range(3)])
    reached = relu_means(net, made)  # row: volume made for channel k; column: channel
    start = relu_means(net, start_noise(x, 2))[0]
    assert bool((reached.diagonal() > start + 0.2).all()), (start, reached)
    # each channel is highest on its own volume
    assert torch.equal(reached.argmax(dim=0), torch.arange(3)), reached
    assert float(made[0].mean()) > 0 > float(made[1].mean())  # bright and dark, as the filters say


@pytest.mark.parametrize("dims", [2, 3])
def test_neuron_objective_raises_the_centre_unit(dims: int) -> None:
    net, x, score = detectors(dims)
    made = run("activation_maximisation", score, x, net.relu, channel=2, objective="neuron",
               steps=20, jitter=0, seed=1)
    centre = (0, 2, *(s // 2 for s in shape(dims)))
    unit = activation(net, net.relu, made)[centre]
    assert float(unit) > float(activation(net, net.relu, start_noise(x, 1))[centre]) + 0.5
    # the edge unit is raised more than the channel as a whole: the optimisation is local
    assert float(unit) > 2 * float(relu_means(net, made)[0, 2])


@pytest.mark.parametrize("dims", [2, 3])
def test_total_variation_penalty_smooths(dims: int) -> None:
    net, x, score = cls_setup(dims)
    opts = dict(steps=30, parameterisation="pixel", jitter=0, l2_weight=0.0, seed=5)
    rough = run("activation_maximisation", score, x, net.conv2, tv_weight=0.0, **opts)
    smooth = run("activation_maximisation", score, x, net.conv2, tv_weight=5.0, **opts)
    assert float(total_variation(smooth)) < 0.7 * float(total_variation(rough))


@pytest.mark.parametrize("dims", [2, 3])
def test_inverted_representation_matches_the_activations(dims: int) -> None:
    net, x, score = seg_setup(dims)
    reference = activation(net, net.conv2, x)
    made = run("inverted_representation", score, x, net.conv2, steps=60, lr=0.1, l2_weight=0.0,
               jitter=0, seed=1)
    before = inversion_loss(activation(net, net.conv2, start_noise(x, 1)), reference)
    after = inversion_loss(activation(net, net.conv2, made), reference)
    assert float(after) < 0.5 * float(before)


@pytest.mark.parametrize("dims", [2, 3])
def test_deep_dream_amplifies_the_layer(dims: int) -> None:
    net, x, score = seg_setup(dims)
    dream = run("deep_dream", score, x, net.conv2, steps=20, seed=0)
    assert float(activation(net, net.conv2, dream).norm()) > 1.2 * float(activation(net, net.conv2, x).norm())
    assert float((dream - x).abs().max()) > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_layer_visualisation_gives_each_channel_its_own_volume(dims: int) -> None:
    net, x, score = detectors(dims)
    made = run("layer_visualisation", score, x, net.relu, channels=0, steps=30, seed=0)
    assert made.shape == (1, 3, *shape(dims))
    reached = relu_means(net, made[0].unsqueeze(1))  # row: volume of channel k
    assert torch.equal(reached.argmax(dim=0), torch.arange(3)), reached
    two = run("layer_visualisation", score, x, net.relu, channels=2, steps=2, seed=0)
    assert two.shape == (1, 2, *shape(dims))


def test_fourier_volume_starts_where_asked_and_damps_high_frequencies() -> None:
    start = torch.randn(2, 1, 6, 8, 10)
    torch.testing.assert_close(TrainableVolume(start, "fourier").image(), start, rtol=1e-4, atol=1e-5)
    scale = frequency_scale((8, 8), 1.0, torch.device("cpu"), torch.float32)
    assert float(scale[0, 0]) == 1.0 and float(scale[4, 4]) < float(scale[1, 0])


# --- refusals ---------------------------------------------------------------------------------


def test_channel_beyond_the_layer_is_refused() -> None:
    net, x, score = seg_setup(3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(MethodError, match="filter index 9 is beyond the layer's channels.*has 4"):
        run("activation_maximisation", score, x, net.conv2, channel=9, steps=2)
    assert_untouched(net, state)


@pytest.mark.parametrize("params", [{"steps": 0}, {"lr": 0.0}, {"parameterisation": "dct"},
                                    {"jitter": -1}])
def test_bad_parameters_are_refused(params: dict) -> None:
    with pytest.raises(MethodError, match=next(iter(params))):
        get_method("activation_maximisation").resolve_params(params)


# --- through the explainer, the pipeline and the CLI -------------------------------------


def test_cli_channel_target_and_volumes_on_the_input_grid(tmp_path, capsys) -> None:
    import nibabel as nib

    from esegeta_engine.cli import main
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    torch.save(TinySegNet(3).state_dict(), tmp_path / "model.pt")
    affine = np.diag([0.5, 0.7, 0.9, 1.0])
    affine[:3, 3] = (10.0, -4.0, 2.0)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 10, 6)).astype(np.float32), affine),
             tmp_path / "vol.nii.gz")
    code = main(["explain", "--model", str(tmp_path / "model.pt"), "--class-path",
                 "tiny_models:TinySegNet", "--kwargs", '{"dims": 3}', "--volume",
                 str(tmp_path / "vol.nii.gz"), "--target", "channel", "--target-layer", "conv2",
                 "--channel", "2", "--method", "guided_backprop",
                 "--method", "activation_maximisation:layers=conv2,steps=3,channel=1",
                 "--out", str(tmp_path / "out"), "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    written = sorted((tmp_path / "out").glob("vol__*__channel-conv2-ch2.nii.gz"))
    written += sorted((tmp_path / "out").glob("vol__activation_maximisation*__volume-ch1.nii.gz"))
    assert len(written) == 2, out
    for path in written:
        img = nib.load(path)
        assert img.shape == (8, 10, 6)
        np.testing.assert_allclose(img.affine, affine)
    assert main(["methods", "--family", "visualisation"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in METHODS) and "saliency" not in listing


def test_trust_metrics_skip_visualisation_volumes() -> None:
    from esegeta_engine.config import EvaluationConfig, MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.evaluation.evaluators import make_evaluators
    from esegeta_engine.explain import Explainer, MapReady
    from esegeta_engine.io import Volume as NiftiVolume

    net, _, _ = seg_setup(3)
    vol = NiftiVolume(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32), np.eye(4))
    evaluators = make_evaluators(EvaluationConfig.model_validate({"infidelity": {"n_perturb_samples": 2}}))
    ex = Explainer(net, PreprocessConfig(), TargetConfig(classes=[1]))
    methods = [MethodConfig(name="saliency"), MethodConfig(name="deep_dream", params={"steps": 2},
                                                           layers=["conv2"])]
    maps = [e for e in ex.iter_explain([vol], methods, evaluators=evaluators, threaded=False)
            if isinstance(e, MapReady)]
    assert "infidelity" in maps[0].metrics and maps[1].metrics == {}
    ex.target = TargetConfig(classes=[0, 1])  # no class is explained: one volume, not one per class
    maps = [e for e in ex.iter_explain([vol], methods, threaded=False) if isinstance(e, MapReady)]
    assert [m.job.spec.name for m in maps] == ["saliency", "saliency", "deep_dream"]


def test_multichannel_inputs_keep_their_channels_in_the_written_volume() -> None:
    from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer, MapReady
    from esegeta_engine.io import Volume as NiftiVolume
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    net = TinySegNet(2, in_channels=2).eval()
    vol = NiftiVolume(np.random.default_rng(0).normal(size=(8, 8, 2)).astype(np.float32), np.eye(4))
    ex = Explainer(net, PreprocessConfig(spatial_dims=2, in_channels=2), TargetConfig(classes=[1]))
    methods = [MethodConfig(name="saliency"),
               MethodConfig(name="deep_dream", params={"steps": 2}, layers=["conv2"]),
               MethodConfig(name="layer_visualisation", params={"steps": 2, "channels": 3},
                            layers=["conv2"])]
    maps = [e for e in ex.iter_explain([vol], methods, threaded=False) if isinstance(e, MapReady)]
    assert [m.array.shape for m in maps] == [(8, 8), (8, 8, 2), (8, 8, 6)]
