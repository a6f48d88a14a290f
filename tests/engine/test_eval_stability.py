"""Stability over ensemble members or input noise; the standard scores as evaluators of a run, 2D and 3D."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import EvaluationConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.evaluation.evaluators import make_evaluators
from esegeta_engine.evaluation.stability import members_of, stability
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.io import Volume

from tiny_models import TinySegNet
from test_eval_mprt import saliency, shape


class Ensemble(nn.Module):
    """Mean of its members' outputs; exposes them through ``members()`` (the stability interface)."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def members(self):
        return list(self.nets)

    def forward(self, x):
        return torch.stack([n(x) for n in self.nets]).mean(0)


@pytest.mark.parametrize("dims", [2, 3])
def test_identical_members_have_zero_spread(dims):
    torch.manual_seed(0)
    net = TinySegNet(dims).eval()
    ens = Ensemble([net, copy.deepcopy(net), copy.deepcopy(net)])
    x = torch.randn(*shape(dims))
    r = stability(saliency, ens, x, members_of(ens))
    assert r["stability_source"] == "members" and r["stability_n"] == 3
    assert r["_stability_std"].max() == 0.0 and r["stability_std_mean"] == 0.0
    assert np.isclose(r["stability_spearman"], 1.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_two_different_networks_have_a_positive_spread(dims):
    torch.manual_seed(0)
    a = TinySegNet(dims).eval()
    torch.manual_seed(1)
    b = TinySegNet(dims).eval()
    x = torch.randn(*shape(dims))
    r = stability(saliency, a, x, [a, b])
    assert r["stability_std_mean"] > 0 and r["stability_spearman"] < 1.0
    expected = np.stack([saliency(a, x), saliency(b, x)]).std(0)
    assert np.allclose(r["_stability_std"], expected)


@pytest.mark.parametrize("dims", [2, 3])
def test_without_members_seeded_noise_gives_the_two_numbers(dims):
    torch.manual_seed(0)
    net = TinySegNet(dims).eval()
    x = torch.randn(*shape(dims))
    assert members_of(net) is None
    r1 = stability(saliency, net, x, None, samples=3, noise=0.2, seed=4)
    r2 = stability(saliency, net, x, None, samples=3, noise=0.2, seed=4)
    assert r1["stability_source"] == "input noise" and r1["stability_n"] == 3
    assert r1["stability_std_mean"] > 0 and r1["stability_std_mean"] == r2["stability_std_mean"]
    assert 0 < r1["stability_spearman"] <= 1


@pytest.mark.parametrize("dims", [2, 3])
def test_standard_scores_run_as_evaluators_with_counted_cost(dims):
    from esegeta_engine.evaluation.standard import metric_cost

    torch.manual_seed(0)
    net = Ensemble([TinySegNet(dims).eval(), TinySegNet(dims).eval()])
    cfg = EvaluationConfig(axioms=None, road={"percentages": [0.25, 0.5], "batch_size": 2},
                           region_perturbation={"region": 2, "steps": 3, "batch_size": 2},
                           mprt={"variant": "efficient"}, stability={})
    vol = Volume(np.random.default_rng(0).normal(size=shape(dims)[2:]).astype(np.float32), np.eye(4))
    ex = Explainer(net, preprocess=PreprocessConfig(spatial_dims=dims), target=TargetConfig(classes=[1]))
    maps = [e for e in ex.iter_explain([vol], [MethodConfig(name="saliency")], evaluators=make_evaluators(cfg),
                                       threaded=False) if isinstance(e, MapReady)]
    m = maps[0].metrics
    assert {"road_morf", "road_lerf", "region_aopc", "mprt_efficient", "stability_spearman"} <= set(m)
    assert m["road_evaluations"] == 3 and m["region_perturbation_evaluations"] == 2
    assert m["mprt_evaluations"] == 2 and m["stability_evaluations"] == 2 and m["stability_source"] == "members"
    assert metric_cost(cfg, 1, n_members=2) == 3 + 2 + 2 + 2
    assert np.isfinite([m["road_morf"], m["road_lerf"], m["region_aopc"], m["mprt_efficient"]]).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_smooth_mprt_evaluator_counts_its_reruns(dims):
    from esegeta_engine.evaluation.standard import metric_cost

    torch.manual_seed(0)
    cfg = EvaluationConfig(axioms=None, mprt={"variant": "smooth", "samples": 2, "max_stages": 2})
    vol = Volume(np.random.default_rng(0).normal(size=shape(dims)[2:]).astype(np.float32), np.eye(4))
    ex = Explainer(TinySegNet(dims).eval(), preprocess=PreprocessConfig(spatial_dims=dims),
                   target=TargetConfig(classes=[1]))
    (ready,) = [e for e in ex.iter_explain([vol], [MethodConfig(name="saliency")], evaluators=make_evaluators(cfg),
                                           threaded=False) if isinstance(e, MapReady)]
    m = ready.metrics
    assert 0 <= m["mprt_smooth"] <= 1
    assert m["mprt_evaluations"] == metric_cost(cfg, 1, n_stages=2) == 2 * (1 + 2)
