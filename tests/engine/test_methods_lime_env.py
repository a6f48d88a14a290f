"""LIME uses one interpretable model whatever is installed (issue 8)."""

from __future__ import annotations

import sys

import pytest
import torch

from esegeta_engine.methods import MethodContext, attribute, get_method
from esegeta_engine.methods._common import feature_mask
from esegeta_engine.forward.scoring import ScoreModel
from esegeta_engine.targets import ClassificationTarget
from tiny_models import LinearScore

GRID = {"mask": "grid", "grid_size": 4}


def _lime(ctx: MethodContext) -> torch.Tensor:
    spec = get_method("lime")
    with torch.no_grad():
        return attribute(spec, ctx, spec.resolve_params({**GRID, "n_samples": 64}))


@pytest.mark.parametrize("dims", [2, 3])
def test_lime_same_map_with_and_without_sklearn(dims: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = LinearScore((1,) + (8,) * dims).eval()
    x = torch.rand(1, 1, *(8,) * dims, generator=torch.Generator().manual_seed(3)) + 0.5
    ctx = MethodContext(ScoreModel(model, ClassificationTarget()), x, target=0, seed=0)
    pytest.importorskip("sklearn")  # the environment of the test matrix has it
    with_sklearn = _lime(ctx)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    without = _lime(ctx)
    torch.testing.assert_close(with_sklearn, without)
    # Not the all-zero map a default Lasso gives: one value per supervoxel, not all zero.
    assert with_sklearn.abs().sum() > 0
    mask = feature_mask(x, GRID)
    for g in mask.unique():
        assert with_sklearn[mask == g].unique().numel() == 1
