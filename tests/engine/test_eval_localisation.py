"""Localisation scores: perfect maps score 1, random maps score chance, edge cases give NaN."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from esegeta_engine.errors import VolumeError
from esegeta_engine.evaluation.localisation import LOCALISATION_METRICS, localisation_scores


def _mask(shape: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(s // 4, s // 4 + max(2, s // 3)) for s in shape)] = True
    return m


@pytest.mark.parametrize("shape", [(24, 20), (16, 14, 10)])
def test_map_equal_to_mask_scores_one(shape):
    m = _mask(shape)
    s = localisation_scores(m.astype(np.float32), m)
    for k in ("mass_inside", "rank_accuracy", "pointing_game", "roc_auc"):
        assert s[k] == pytest.approx(1.0), k
    assert s["mask_fraction"] == pytest.approx(m.mean())
    assert "note" not in s


@pytest.mark.parametrize("shape", [(40, 36), (20, 18, 12)])
def test_random_maps_score_chance(shape):
    m = _mask(shape)
    runs = [localisation_scores(np.random.default_rng(seed).random(shape), m) for seed in range(5)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in ("mass_inside", "rank_accuracy", "roc_auc")}
    frac = m.mean()
    assert mean["mass_inside"] == pytest.approx(frac, abs=0.02)
    assert mean["rank_accuracy"] == pytest.approx(frac, abs=0.03)
    assert mean["roc_auc"] == pytest.approx(0.5, abs=0.03)


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, size=(6, 7)).astype(float)  # many ties
    m = rng.random((6, 7)) < 0.3
    pos, neg = a[m], a[~m]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos, neg)]
    assert localisation_scores(a, m)["roc_auc"] == pytest.approx(np.mean(pairs))


def test_rank_accuracy_resolves_ties_at_the_cut_by_expectation():
    m = np.zeros(10, bool)
    m[:2] = True
    a = np.zeros(10)
    a[[0, 5, 6, 7]] = 1.0  # 4 tied top voxels for 2 slots, 1 of them inside
    assert localisation_scores(a, m)["rank_accuracy"] == pytest.approx(0.25)


def test_pointing_game_miss_and_tolerance():
    m = np.zeros((10, 10), bool)
    m[2:4, 2:4] = True
    a = np.zeros((10, 10))
    a[5, 3] = 1.0  # two voxels below the mask
    assert localisation_scores(a, m)["pointing_game"] == 0.0
    assert localisation_scores(a, m, tolerance=1)["pointing_game"] == 0.0
    assert localisation_scores(a, m, tolerance=2)["pointing_game"] == 1.0


def test_sign_handling():
    m = _mask((12, 12))
    neg = -m.astype(float)
    s = localisation_scores(neg, m)  # all relevance negative: nothing positive to place
    assert math.isnan(s["mass_inside"]) and s["roc_auc"] == pytest.approx(0.0) and "note" in s
    s = localisation_scores(neg, m, positive_only=False)  # magnitude counts
    assert s["mass_inside"] == pytest.approx(1.0) and s["roc_auc"] == pytest.approx(1.0)


def test_wrong_shape_mask_raises_volume_error_naming_both_shapes():
    with pytest.raises(VolumeError) as err:
        localisation_scores(np.zeros((8, 9, 10)), np.zeros((8, 9, 11)))
    assert "(8, 9, 10)" in str(err.value) and "(8, 9, 11)" in str(err.value)


def test_non_finite_map_raises():
    a = np.zeros((4, 4))
    a[1, 1] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        localisation_scores(a, np.eye(4))


@pytest.mark.parametrize("fill", [0, 1])
def test_empty_or_full_mask_gives_nan_and_a_note(fill):
    s = localisation_scores(np.random.default_rng(0).random((6, 6, 6)), np.full((6, 6, 6), fill))
    assert all(math.isnan(s[k]) for k in LOCALISATION_METRICS if k != "mask_fraction")
    assert s["mask_fraction"] == fill
    assert ("empty" if fill == 0 else "whole") in s["note"]


def test_constant_map_gives_nan_roc_and_chance_mass():
    m = _mask((10, 10, 10))
    s = localisation_scores(np.full(m.shape, 0.3), m)
    assert math.isnan(s["roc_auc"]) and math.isnan(s["pointing_game"]) and "constant" in s["note"]
    assert s["mass_inside"] == pytest.approx(m.mean()) and s["rank_accuracy"] == pytest.approx(m.mean())
    z = localisation_scores(np.zeros(m.shape), m)
    assert math.isnan(z["mass_inside"]) and math.isnan(z["roc_auc"])


@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 8)])
def test_thresholded_overlap_matches_scikit_learn(shape) -> None:
    """IoU and Dice of the Otsu / top-k thresholded map against jaccard_score and f1_score."""
    from sklearn.metrics import f1_score, jaccard_score
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(3)
    m = np.zeros(shape, bool)
    m[tuple(slice(s // 4, s // 2) for s in shape)] = True
    a = rng.normal(size=shape) + 2.0 * m
    s = localisation_scores(a, m, top_fraction=0.1)
    rel = np.clip(a, 0, None)
    otsu = rel > threshold_otsu(rel)
    assert s["iou_otsu"] == pytest.approx(jaccard_score(m.ravel(), otsu.ravel()))
    assert s["dice_otsu"] == pytest.approx(f1_score(m.ravel(), otsu.ravel()))
    k = int(round(0.1 * a.size))
    top = np.zeros(a.size, bool)
    top[np.argsort(-rel.ravel(), kind="stable")[:k]] = True
    assert s["iou_top"] == pytest.approx(jaccard_score(m.ravel(), top))
    assert s["dice_top"] == pytest.approx(f1_score(m.ravel(), top))
    perfect = localisation_scores(m.astype(float), m)
    assert perfect["iou_otsu"] == perfect["dice_otsu"] == 1.0
    flat = localisation_scores(np.ones(shape), m)
    assert math.isnan(flat["iou_otsu"]) and "thresholded overlaps are undefined" in flat["note"]
