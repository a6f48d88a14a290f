"""Class-contrast check (issue 9, part 3): a map that ignores the class is flagged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esegeta_engine.config import ClassContrastConfig, EvaluationConfig
from esegeta_engine.evaluation.contrast import class_contrast, contrast_class
from esegeta_engine.evaluation.evaluators import make_evaluators
from esegeta_engine.explain import Job
from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ClassificationTarget
from test_eval_randomisation import IDENTITY
from tiny_models import LinearScore, shape


@pytest.mark.parametrize("dims", [2, 3])
def test_a_map_that_ignores_the_class_is_flagged(dims: int) -> None:
    net = LinearScore(shape(dims), classes=4, seed=dims).eval()
    x = torch.randn(1, 1, *shape(dims))
    sm = ScoreModel(net, ClassificationTarget())
    ctx = MethodContext(sm, x, 1, seed=0)
    same = attribute(IDENTITY, ctx, {})
    out = class_contrast(IDENTITY, ctx, {}, same)
    assert out["class_contrast_status"] == "flagged" and out["class_contrast_spearman"] == pytest.approx(1.0)
    assert "hardly changes with the class" in out["class_contrast_note"]
    sal = get_method("saliency")
    params = sal.resolve_params({})
    attr = attribute(sal, ctx, params)
    out = class_contrast(sal, MethodContext(sm, x, 1, seed=0), params, attr)
    other = out["class_contrast_class"]
    assert other != 1 and other == contrast_class(4, 1, 0)
    # saliency of a linear score is |w_k|: independent weights per class -> low rank correlation
    w = net.weight.detach()
    from scipy.stats import spearmanr

    expected = spearmanr(w[1].abs().ravel(), w[other].abs().ravel()).statistic
    assert out["class_contrast_spearman"] == pytest.approx(expected, abs=1e-6)
    assert out["class_contrast_status"] == "ok"


def test_contrast_class_is_seeded_and_never_the_target() -> None:
    draws = {contrast_class(5, 2, s) for s in range(40)}
    assert 2 not in draws and draws == {0, 1, 3, 4}
    assert contrast_class(5, 2, 7) == contrast_class(5, 2, 7)
    assert contrast_class(1, 0, 0) is None


def test_evaluator_with_a_given_class() -> None:
    net = LinearScore(shape(2), classes=3).eval()
    x = torch.randn(1, 1, *shape(2))
    sm = ScoreModel(net, ClassificationTarget())
    [ev] = make_evaluators(EvaluationConfig(axioms=None, class_contrast=ClassContrastConfig(other_class=2)))
    sal = get_method("saliency")
    params = sal.resolve_params({})
    ctx = MethodContext(sm, x, 0)
    out = ev(Job(sal, params, 0, "class-0", (0,)), ctx, attribute(sal, ctx, params))
    assert out["class_contrast_class"] == 2 and np.isfinite(out["class_contrast_spearman"])
