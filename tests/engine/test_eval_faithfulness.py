"""Deletion/insertion curves: the true attribution of an analytic model beats random and reversed maps."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch

from esegeta_engine.errors import Cancelled, MethodError
from esegeta_engine.evaluation.faithfulness import Curves, faithfulness_curves, random_baseline_curves
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ArgmaxRegionTarget

SHAPES = {2: (12, 10), 3: (8, 7, 6)}


def linear_case(dims: int, channels: int = 1, n: int = 1):
    """score_k(x) = <w_k, x> with w, x >= 0: w * x is the exact attribution of class 0."""
    g = torch.Generator().manual_seed(dims)
    w = torch.rand(2, channels, *SHAPES[dims], generator=g)
    x = torch.rand(n, channels, *SHAPES[dims], generator=g)

    def score(t: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nc...,kc...->nk", t, w)

    return score, x, w[:1] * x


@pytest.mark.parametrize("dims", [2, 3])
def test_true_attribution_falls_and_rises_fastest(dims):
    f, x, attr = linear_case(dims)
    kw = {"steps": 10, "baseline": "zero", "batch_size": 4}
    good = faithfulness_curves(f, x, attr, 0, **kw)
    worst = faithfulness_curves(f, x, -attr, 0, **kw)
    rand = [random_baseline_curves(f, x, 0, seed=s, **kw) for s in range(3)]
    rand_del = np.mean([r.auc_deletion for r in rand])
    rand_ins = np.mean([r.auc_insertion for r in rand])
    assert good.auc_deletion < rand_del < worst.auc_deletion
    assert good.auc_insertion > rand_ins > worst.auc_insertion
    assert good.aopc_deletion > np.mean([r.aopc_deletion for r in rand]) > worst.aopc_deletion
    # With a zero baseline the curves of a linear model are monotone and meet at the ends.
    assert np.all(np.diff(good.deletion) <= 1e-9) and np.all(np.diff(good.insertion) >= -1e-9)
    assert good.deletion_norm[0] == pytest.approx(1.0) and good.deletion_norm[-1] == pytest.approx(0.0)
    assert good.insertion_norm[0] == pytest.approx(0.0) and good.insertion_norm[-1] == pytest.approx(1.0)
    assert good.fractions[0] == 0.0 and good.fractions[-1] == 1.0 and len(good.fractions) == 11


def test_curves_shape_endpoints_and_dict():
    f, x, attr = linear_case(3)
    c = faithfulness_curves(f, x, attr[0, 0], 0, steps=5, baseline="mean")
    assert isinstance(c, Curves)
    assert c.deletion.shape == c.insertion.shape == c.fractions.shape == (6,)
    assert c.deletion[0] == pytest.approx(c.insertion[-1]) == pytest.approx(c.score)
    assert c.deletion[-1] == pytest.approx(c.insertion[0]) == pytest.approx(c.baseline_score)
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert {"fractions", "deletion_norm", "insertion_norm", "auc_deletion", "aopc_deletion"} <= set(d)


def test_multichannel_map_is_channel_summed_and_applied_to_all_channels():
    f, x, attr = linear_case(2, channels=3)
    per_channel = faithfulness_curves(f, x, attr, 0, steps=6, baseline="zero")
    summed = faithfulness_curves(f, x, attr.sum(1), 0, steps=6, baseline="zero")
    np.testing.assert_allclose(per_channel.deletion, summed.deletion)
    assert per_channel.deletion[-1] == pytest.approx(0.0)  # every channel of every voxel replaced


def test_batch_of_inputs_and_batch_size_do_not_change_curves():
    f, x, attr = linear_case(2, n=2)
    a = faithfulness_curves(f, x, attr, 0, steps=5, baseline="blur", batch_size=1)
    b = faithfulness_curves(f, x, attr, 0, steps=5, baseline="blur", batch_size=7)
    np.testing.assert_allclose(a.deletion, b.deletion, rtol=1e-6)
    np.testing.assert_allclose(a.insertion_norm, b.insertion_norm, rtol=1e-6)


def test_score_model_with_frozen_target_counts_batched_evaluations():
    from tiny_models import TinySegNet

    model = TinySegNet(3).eval()
    sm = ScoreModel(model, ArgmaxRegionTarget(activation="softmax"))
    x = torch.rand(2, 1, 6, 6, 5)
    attr = torch.rand(2, 1, 6, 6, 5)
    steps, batch = 6, 4
    c = faithfulness_curves(sm, x, attr, 1, steps=steps, batch_size=batch)
    # one call to freeze the target, then 2 * steps perturbed copies in batches of `batch`
    assert sm.monitor.count == 1 + math.ceil(2 * steps / batch)
    assert sm.target.region.shape == (2, 6, 6, 5)
    assert np.isfinite(c.deletion).all() and np.isfinite(c.auc_insertion)


def test_cancel_stops_before_the_next_model_call():
    f, x, attr = linear_case(2)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        faithfulness_curves(f, x, attr, 0, cancel=cancel)


def test_zero_score_gives_nan_normalised_curves_with_a_note():
    x = torch.rand(1, 1, 5, 5)
    c = faithfulness_curves(lambda t: t.flatten(1).sum(1, keepdim=True) * 0, x, x, 0, steps=3)
    assert np.isnan(c.deletion_norm).all() and math.isnan(c.auc_deletion) and "zero" in c.note
    assert c.to_dict()["auc_deletion"] is None


def test_bad_attribution_shape_or_target_raises():
    f, x, _ = linear_case(2)
    with pytest.raises(MethodError, match="does not fit"):
        faithfulness_curves(f, x, torch.rand(3, 3), 0)
    with pytest.raises(MethodError, match="target 5"):
        faithfulness_curves(f, x, torch.rand(*SHAPES[2]), 5, steps=2)
