"""Cascading / independent model-parameter randomisation (Adebayo et al. 2018)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esegeta_engine.errors import Cancelled
from esegeta_engine.evaluation import execution_order, randomised_copies, run_randomisation
from esegeta_engine.methods import Call, MethodSpec, get_method
from esegeta_engine.sample.nets import UNet
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget
from tiny_models import TinySegNet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add overhead, and on a busy machine
    # spinning OpenMP workers make each step up to 100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Reversed(nn.Module):
    """Modules registered in the reverse of their call order, one reused."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 2, 1)
        self.norm = nn.BatchNorm2d(3)
        self.unused = nn.Linear(2, 2)
        self.body = nn.Conv2d(3, 3, 3, padding=1)
        self.stem = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.body(self.norm(self.body(x)))
        return self.head(x)


class Passthrough:
    """A 'method' whose map is the input: it ignores the weights."""

    def attribute(self, inputs: torch.Tensor, target: int | None = None) -> torch.Tensor:
        return inputs.clone()


IDENTITY = MethodSpec("input_itself", "gradient", "Input", "the input (test only)", (),
                      lambda ctx, p: Call(Passthrough()))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def tiny_case(dims: int) -> tuple[TinySegNet, torch.Tensor, ArgmaxRegionTarget]:
    torch.manual_seed(3)
    net = TinySegNet(dims).eval()
    x = torch.randn(1, 1, *(8,) * dims)
    with torch.no_grad():
        out = net(x)
        net.head.bias[1] -= (out[:, 1] - out[:, 0]).median()
        target = ArgmaxRegionTarget()
        target.prepare(net(x))
    return net, x, target


def test_execution_order_follows_data_flow() -> None:
    model = Reversed()
    x = torch.randn(1, 1, 6, 6)
    registered = [n for n, m in model.named_modules() if n]
    assert registered == ["head", "norm", "unused", "body", "stem"]
    before = hook_count(model)
    assert execution_order(model, x) == ["stem", "body", "norm", "head"]
    assert hook_count(model) == before


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_exactly_the_claimed_layers_change(mode: str) -> None:
    net, x, _ = tiny_case(3)
    net.train()  # the user's flag must survive
    user = snapshot(net)
    hooks = hook_count(net)
    order = execution_order(net, x)
    assert order == ["conv1", "conv2", "head"]
    changed: dict[str, list[str]] = {}
    previous = user
    seen = []
    for stage, name, copy_ in randomised_copies(net, order, mode, seed=1, changed=changed):
        seen.append(name)
        assert copy_ is not net and not copy_.training
        now = snapshot(copy_)
        reference = previous if mode == "cascading" else user
        differ = {k for k in now if not torch.equal(now[k], reference[k])}
        assert differ == {f"{name}.weight", f"{name}.bias"}
        assert changed[name] == ["weight", "bias"]
        if mode == "cascading":  # all layers of earlier stages stay randomised
            assert all(not torch.equal(now[f"{n}.weight"], user[f"{n}.weight"]) for n in seen)
        previous = now
    assert seen == ["head", "conv2", "conv1"]  # output end first
    assert all(torch.equal(v, user[k]) for k, v in net.state_dict().items())
    assert net.training and all(m.training for m in net.modules())
    assert hook_count(net) == hooks


def test_same_seed_same_weights_in_both_modes_and_max_stages() -> None:
    net, x, _ = tiny_case(2)
    order = execution_order(net, x)
    casc = [snapshot(c) for _, _, c in randomised_copies(net, order, "cascading", 4, max_stages=1)]
    ind = [snapshot(c) for _, _, c in randomised_copies(net, order, "independent", 4)]
    assert len(casc) == 1 and len(ind) == 3
    assert torch.equal(casc[0]["head.weight"], ind[0]["head.weight"])
    again = [snapshot(c) for _, _, c in randomised_copies(net, order, "independent", 4)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ind, again) for k in a)


def trained_unet() -> tuple[UNet, torch.Tensor, ArgmaxRegionTarget]:
    """A small 2D U-Net trained for a few steps to segment bright squares."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = 0.1 * torch.randn(n, 1, 16, 16, generator=g)
        y = torch.zeros(n, 16, 16, dtype=torch.long)
        for i in range(n):
            r, c = torch.randint(3, 13, (2,), generator=g).tolist()
            x[i, 0, r - 2:r + 2, c - 2:c + 2] += 1.0
            y[i, r - 2:r + 2, c - 2:c + 2] = 1
        return x, y

    net = UNet(2, 1, 2, (4, 8))
    for _ in range(15):  # plain SGD by hand (torch.optim imports torch._dynamo: seconds)
        x, y = batch(8)
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
        with torch.no_grad():
            for p, g_ in zip(net.parameters(), grads):
                p -= 0.2 * g_
    net.eval()
    x = batch(1)[0]
    target = ArgmaxRegionTarget()
    with torch.no_grad():
        target.prepare(net(x))
    return net, x, target


def test_sanity_verdicts() -> None:
    net, x, target = trained_unet()
    user = snapshot(net)
    calls = []
    result = run_randomisation(
        net, lambda m: ScoreModel(m, target), x, 0,  # background class: a large region
        [(get_method("saliency"), {}, None), (IDENTITY, {}, None),
         (get_method("layer_gradcam"), {}, "ups.0.block.conv2")],
        progress=lambda done, total, msg: calls.append((done, total)))
    assert result.errors == []
    assert len(result.stages) == len(result.order) == 14 and result.stages[0] == "head"
    assert result.verdicts["input_itself"]["passes"] is False
    assert result.verdicts["input_itself"]["mean_spearman_abs"] == pytest.approx(1.0)
    assert result.verdicts["saliency"]["passes"] is True
    assert result.verdicts["saliency"]["mean_spearman_abs"] < 0.4
    assert "layer_gradcam@ups.0.block.conv2" in result.verdicts
    assert set(result.maps["saliency"]) == set(result.stages)
    assert result.original_maps["saliency"].shape == (1, 16, 16)
    assert result.maps["layer_gradcam@ups.0.block.conv2"]["head"].shape == (1, 16, 16)
    assert calls[-1] == (51, 51)  # 3 methods x (original + 14 stages + 2 null networks)
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert "maps" not in json.loads(text)
    assert all(torch.equal(v, user[k]) for k, v in net.state_dict().items())


def test_failing_stage_is_recorded_and_the_rest_goes_on() -> None:
    net, x, target = tiny_case(2)
    runs = {"n": 0}

    def build(ctx, params):  # fails on its second run: the first randomised stage
        runs["n"] += 1
        if runs["n"] == 2:
            raise RuntimeError("boom")
        return Call(Passthrough())

    def broken(ctx, params):
        raise ValueError("never works")

    flaky = MethodSpec("flaky", "gradient", "Flaky", "fails once (test only)", (), build)
    dead = MethodSpec("dead", "gradient", "Dead", "always fails (test only)", (), broken)
    result = run_randomisation(net, lambda m: ScoreModel(m, target), x, 1,
                               [(flaky, {}, None), (get_method("saliency"), {}, None), (dead, {}, None)],
                               mode="independent")
    assert result.errors == [
        {"method": "dead", "stage": "original", "status": "failed", "message": "ValueError: never works"},
        {"method": "flaky", "stage": "head", "status": "failed", "message": "RuntimeError: boom"}]
    assert set(result.maps["flaky"]) == {"conv2", "conv1"}
    assert set(result.scores["flaky"]) == {"conv2", "conv1"}
    assert set(result.maps["saliency"]) == {"head", "conv2", "conv1"}
    assert "dead" not in result.maps and "dead" not in result.original_maps
    assert set(result.verdicts) == {"flaky", "saliency", "dead"}
    assert result.verdicts["dead"]["verdict"] == "no verdict"
    assert "failed on the trained model" in result.verdicts["dead"]["reason"]
    assert "undefined" in result.verdicts["flaky"]["reason"]  # the failed stage is named, left out
    assert json.loads(json.dumps(result.to_dict()))["errors"][1]["stage"] == "head"


def test_duplicate_methods_and_cancel() -> None:
    net, x, target = tiny_case(2)
    sal = get_method("saliency")
    result = run_randomisation(net, lambda m: ScoreModel(m, target), x, 1,
                               [(sal, {}, None), (sal, {"abs": False}, None)], max_stages=1)
    assert list(result.verdicts) == ["saliency", "saliency#2"] and result.stages == ["head"]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        run_randomisation(net, lambda m: ScoreModel(m, target), x, 1, [(sal, {}, None)], cancel=cancel)


@pytest.mark.slow
def test_sample_unet_saliency_passes_on_the_background_class() -> None:
    sample = pytest.importorskip("esegeta_engine.sample")
    try:
        net = sample.load_sample_unet()
    except (FileNotFoundError, KeyError, OSError):
        pytest.skip("the sample U-Net weights are not installed")
    vol = sample.minmax_normalise(sample.make_phantom((32,) * 3, seed=7).volume)
    x = torch.from_numpy(vol)[None, None].float()
    target = ArgmaxRegionTarget()
    with torch.no_grad():
        target.prepare(net(x))
    result = run_randomisation(net, lambda m: ScoreModel(m, target), x, 0,
                               [(get_method("saliency"), {}, None)])
    assert result.errors == [] and len(result.stages) == len(result.order) > 10
    assert result.verdicts["saliency"]["passes"] is True
