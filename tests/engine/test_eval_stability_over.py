"""``evaluation.stability.over``: folds, mirrors, models or noise, through a pipeline's ``members(kind)``.

The fake pipeline below stands for a deployed nnU-Net model (``models/nnunet/pipeline.py``), which
exposes the same protocol: ``members(kind="folds" | "mirrors")`` returning pipelines callable on the
same input, each named by ``member_name``; the ensemble's output is the mean of its members'.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from esegeta_engine.config import EvaluationConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.errors import MethodError
from esegeta_engine.evaluation.evaluators import make_evaluators
from esegeta_engine.evaluation.stability import choose_members
from esegeta_engine.evaluation.trust import scorecard
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.io import Volume

from tiny_models import TinySegNet


class Flip(nn.Module):
    """A network seen through a mirrored input (flip, run, flip back): one mirrored copy."""

    def __init__(self, net: nn.Module, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.net, self.axes = net, axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flip(self.axes)).flip(self.axes) if self.axes else self.net(x)


class FakePipeline(nn.Module):
    """Folds x mirrored copies, averaged; ``members(kind)`` as nnU-Net's pipeline gives them."""

    def __init__(self, folds: list[nn.Module], mirrors: list[tuple[int, ...]], name: str = "") -> None:
        super().__init__()
        self.folds = nn.ModuleList(folds)
        self.mirrors = mirrors
        self.member_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([Flip(f, a)(x) for f in self.folds for a in self.mirrors]).mean(0)

    def members(self, kind: str | None = None) -> list[FakePipeline]:
        kind = kind or ("folds" if len(self.folds) > 1 else "mirrors")
        if kind == "folds":
            return [FakePipeline([f], self.mirrors, f"fold {i}") for i, f in enumerate(self.folds)]
        return [FakePipeline(list(self.folds), [a], f"mirror axes {a}") for a in self.mirrors]


def _pipeline(dims: int, folds: int, same: bool = False) -> FakePipeline:
    torch.manual_seed(0)
    nets = [TinySegNet(dims).eval()]
    for i in range(1, folds):
        torch.manual_seed(i)
        nets.append(copy.deepcopy(nets[0]) if same else TinySegNet(dims).eval())
    return FakePipeline(nets, [(), (2,)]).eval()


def _run(model: nn.Module, dims: int, **stability):
    cfg = EvaluationConfig(axioms=None, stability=stability)
    vol = Volume(np.random.default_rng(0).normal(size=(8,) * dims).astype(np.float32), np.eye(4))
    # class 0: the region the random folds' ensemble predicts (class 1 is predicted nowhere)
    ex = Explainer(model, preprocess=PreprocessConfig(spatial_dims=dims), target=TargetConfig(classes=[0]))
    methods = [MethodConfig(name="saliency")]
    expected = ex.estimate([vol], methods, cfg) - ex.estimate([vol], methods)
    (ready,) = [e for e in ex.iter_explain([vol], methods, evaluators=make_evaluators(cfg), threaded=False)
                if isinstance(e, MapReady)]
    return ready.metrics, expected


@pytest.mark.parametrize("dims", [2, 3])
def test_over_folds_explains_each_fold_alone(dims):
    m, expected = _run(_pipeline(dims, 3), dims, over="folds")
    assert m["stability_over"] == "folds" and m["stability_n"] == 3
    assert m["stability_members"] == "fold 0; fold 1; fold 2"
    assert m["stability_std_mean"] > 0 and m["stability_evaluations"] == 3 == expected  # one saliency a fold
    card = scorecard(m)["stability"]
    assert card["status"] in ("checked", "failed") and "over 3 folds" in card["what"]


@pytest.mark.parametrize("dims", [2, 3])
def test_identical_folds_give_zero_spread_and_mirrors_are_members_too(dims):
    m, _ = _run(_pipeline(dims, 2, same=True), dims, over="folds")
    assert m["stability_std_mean"] == 0.0 and np.isclose(m["stability_spearman"], 1.0)
    m, expected = _run(_pipeline(dims, 2), dims, over="mirrors")
    assert m["stability_over"] == "mirrors" and m["stability_members"] == "mirror axes (); mirror axes (2,)"
    assert m["stability_evaluations"] == 2 == expected


@pytest.mark.parametrize("dims", [2, 3])
def test_auto_takes_the_folds_when_there_are_several_else_noise(dims):
    m, _ = _run(_pipeline(dims, 2), dims)
    assert m["stability_over"] == "folds" and m["stability_n"] == 2
    m, expected = _run(_pipeline(dims, 1), dims, samples=3)  # one fold: not its mirrors, seeded noise
    assert m["stability_over"] == "noise" and m["stability_n"] == 3 and m["stability_evaluations"] == 3 == expected
    assert "over 3 noisy inputs" in scorecard(m)["stability"]["what"]


def test_folds_asked_of_a_model_without_them_is_one_clear_line():
    with pytest.raises(MethodError, match="stability over folds: the model has 1 fold member") as exc:
        choose_members(_pipeline(2, 1), "folds")
    assert "stability.over: noise" in exc.value.fix
    with pytest.raises(MethodError, match="0 mirror member"):
        choose_members(TinySegNet(2), "mirrors")
    # in a run the map is kept and the failure recorded on it; the estimate counts no evaluation for it
    m, expected = _run(TinySegNet(2).eval(), 2, over="folds")
    assert "stability over folds" in m["stability_error"] and expected == 0


def test_over_models_needs_the_list_and_noise_ignores_members():
    with pytest.raises(ValidationError, match="needs stability.models"):
        EvaluationConfig(stability={"over": "models"})
    with pytest.raises(ValidationError, match="use over 'models'"):
        EvaluationConfig(stability={"over": "folds", "models": ["a.pt"]})
    assert choose_members(_pipeline(2, 3), "noise") == ("noise", None)
