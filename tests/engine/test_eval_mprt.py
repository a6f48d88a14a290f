"""Smooth and efficient MPRT against an independent implementation written from the paper, 2D and 3D."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from esegeta_engine.evaluation.mprt import efficient_mprt, smooth_mprt

from tiny_models import TinySegNet


def saliency(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """|d (class-1 output summed) / dx| by plain autograd, channels summed: (N, *spatial)."""
    xr = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    return g.abs().sum(1).numpy()


def stages_of(model: nn.Module, names=("head", "conv2", "conv1")):
    """Cascading randomisation written here: re-draw each layer's weights, output end first."""
    work = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    out = []
    for name in names:
        layer = getattr(work, name)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5)
        out.append((name, copy.deepcopy(work)))
    return out


def shape(dims):
    return (1, 1, 8, 7) if dims == 2 else (1, 1, 6, 5, 4)


@pytest.mark.parametrize("dims", [2, 3])
def test_smooth_mprt_equals_the_paper_written_out(dims):
    torch.manual_seed(dims)
    model = TinySegNet(dims).eval()
    x = torch.randn(*shape(dims))
    samples, noise, seed = 5, 0.2, 3
    got = smooth_mprt(saliency, model, stages_of(model), x, samples=samples, noise=noise, seed=seed)

    def smooth(m):  # the paper: average the explanation over N noisy inputs, same draws for every model
        rng = np.random.default_rng(seed)
        sigma = noise * float(x.max() - x.min())
        acc = [saliency(m, x + torch.from_numpy(rng.normal(0, sigma, x.shape)).float()) for _ in range(samples)]
        return np.mean(acc, axis=0)

    ref = smooth(model)
    expected = {name: abs(stats.spearmanr(np.abs(ref).ravel(), np.abs(smooth(m)).ravel()).statistic)
                for name, m in stages_of(model)}
    assert got["mprt_smooth_stages"].keys() == expected.keys()
    for k in expected:
        assert np.isclose(abs(got["mprt_smooth_stages"][k]), expected[k], atol=1e-6)
    assert np.isclose(got["mprt_smooth"], np.mean([got["mprt_smooth_stages"][k] for k in expected]))
    # a smoothed map of the unchanged model is perfectly similar to itself
    same = smooth_mprt(saliency, model, [("none", model)], x, samples=samples, noise=noise, seed=seed)
    assert np.isclose(same["mprt_smooth"], 1.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_efficient_mprt_is_the_entropy_ratio(dims):
    torch.manual_seed(dims)
    model = TinySegNet(dims).eval()
    x = torch.randn(*shape(dims))
    randomised = stages_of(model)[-1][1]
    got = efficient_mprt(saliency, model, randomised, x, n_bins=16)

    def entropy(a):
        counts, _ = np.histogram(a.ravel(), bins=16)
        return stats.entropy(counts)  # scipy normalises the counts; natural log

    h0, h1 = entropy(saliency(model, x)), entropy(saliency(randomised, x))
    assert np.isclose(got["mprt_entropy_original"], h0) and np.isclose(got["mprt_entropy_randomised"], h1)
    assert np.isclose(got["mprt_efficient"], h1 / h0)
