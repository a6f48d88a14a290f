"""Every target gives (N, K) scores with real, non-zero gradients, in 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esegeta_engine.errors import TargetError
from esegeta_engine.targets import (
    ArgmaxRegionTarget,
    ClassificationTarget,
    OtsuThresholdTarget,
    RegionOfInterestTarget,
    VoxelTarget,
)

SHAPES = {2: (8, 8), 3: (6, 6, 6)}


def seg_output(dims: int, k: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, k, *SHAPES[dims], requires_grad=True)


def grads(target, out: torch.Tensor, cls: int) -> torch.Tensor:
    target.prepare(out.detach())
    scores = target(out)
    (g,) = torch.autograd.grad(scores[:, cls].sum(), out)
    return g


@pytest.mark.parametrize("dims", [2, 3])
def test_argmax_region_sums_class_scores_over_predicted_voxels(dims):
    out = seg_output(dims)
    t = ArgmaxRegionTarget()
    t.prepare(out.detach())
    scores = t(out)
    assert scores.shape == (2, 3)
    region = out.detach().argmax(1)
    for n in range(2):
        for c in range(3):
            expected = out.detach()[n, c][region[n] == c].sum()
            assert torch.isclose(scores[n, c], expected, atol=1e-5)
    g = grads(t, out, 1)
    # gradient is exactly the indicator of the class-1 region on channel 1
    assert torch.equal(g[:, 1] != 0, region == 1)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_argmax_region_frozen_vs_per_forward(dims):
    out = seg_output(dims)
    frozen, live = ArgmaxRegionTarget(frozen=True), ArgmaxRegionTarget(frozen=False)
    frozen.prepare(out.detach())
    live.prepare(out.detach())
    perturbed = out.detach().clone()
    perturbed[:, 0] += 10.0  # everything becomes class 0
    assert torch.allclose(frozen(perturbed)[:, 1], (perturbed[:, 1] * (out.detach().argmax(1) == 1)).flatten(1).sum(1))
    assert torch.all(live(perturbed)[:, 1] == 0)


def test_argmax_frozen_region_tiles_over_perturbation_batches():
    out = seg_output(3)
    t = ArgmaxRegionTarget()
    t.prepare(out.detach())
    batch = torch.cat([out.detach()] * 3)  # Captum stacks copies input-major
    assert torch.allclose(t(batch), torch.cat([t(out.detach())] * 3))


@pytest.mark.parametrize("dims", [2, 3])
def test_otsu_target_has_nonzero_gradients(dims):
    # The original implementation computed out/out on a detached mask: zero gradients.
    torch.manual_seed(2)
    logits = torch.randn(1, 1, *SHAPES[dims]) * 3
    logits = logits.requires_grad_()
    t = OtsuThresholdTarget()
    for cls in (0, 1):
        g = grads(t, logits, cls)
        assert g.abs().sum() > 1e-3, f"class {cls} has no gradient"
    assert t.foreground.any() and not t.foreground.all()
    # foreground score is the sum of probabilities over the Otsu foreground
    p = torch.sigmoid(logits.detach())[:, 0]
    assert torch.isclose(t(logits)[0, 1], p[t.foreground].sum(), atol=1e-4)


def test_otsu_threshold_matches_scikit_image():
    from skimage.filters import threshold_otsu

    torch.manual_seed(3)
    prob = torch.rand(1, 1, 6, 6, 6)
    t = OtsuThresholdTarget(activation="none")
    t.prepare(prob)
    p = prob[0, 0].numpy()
    norm = (p - p.min()) / (p.max() - p.min())
    assert np.array_equal(t.foreground[0].numpy(), norm > threshold_otsu(norm))


@pytest.mark.parametrize("dims", [2, 3])
def test_roi_target_sums_inside_mask_only(dims):
    out = seg_output(dims)
    mask = np.zeros(SHAPES[dims], dtype=bool)
    mask[(slice(1, 3),) * dims] = True
    t = RegionOfInterestTarget(mask)
    g = grads(t, out, 2)
    inside = torch.from_numpy(mask)
    assert torch.all(g[:, 2][:, inside] == 1) and torch.all(g[:, 2][:, ~inside] == 0)
    assert torch.all(g[:, [0, 1]] == 0)


def test_roi_target_rejects_empty_and_misshaped_masks():
    with pytest.raises(TargetError, match="empty"):
        RegionOfInterestTarget(np.zeros((4, 4, 4)))
    t = RegionOfInterestTarget(np.ones((4, 4, 4)))
    with pytest.raises(TargetError, match="grid"):
        t(seg_output(3))


@pytest.mark.parametrize("dims", [2, 3])
def test_voxel_target(dims):
    out = seg_output(dims)
    idx = (1,) * dims
    t = VoxelTarget(idx, activation="softmax")
    g = grads(t, out, 0)
    assert g.abs().sum() > 0
    nz = g.abs().sum(1).nonzero()
    assert nz.shape[0] == 2 and all(tuple(r[1:].tolist()) == idx for r in nz)
    with pytest.raises(TargetError, match="outside"):
        VoxelTarget((99,) * dims)(out)


def test_classification_target():
    logits = torch.randn(3, 4, requires_grad=True)
    t = ClassificationTarget("softmax")
    g = grads(t, logits, 2)
    assert g.abs().sum() > 0
    assert t.default_classes(logits) == [int(logits[0].argmax())]
    with pytest.raises(TargetError, match="classification"):
        t(torch.randn(1, 2, 4, 4))


def test_segmentation_targets_reject_classifier_output():
    with pytest.raises(TargetError, match="segmentation output"):
        ArgmaxRegionTarget()(torch.randn(2, 3))
    with pytest.raises(TargetError, match="otsu"):
        ArgmaxRegionTarget()(torch.randn(1, 1, 4, 4))


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_channel_argmax_equals_torch_argmax_with_ties_and_nan(spatial, n):
    from esegeta_engine.targets import channel_argmax, present_labels

    g = torch.Generator().manual_seed(n)
    for x in (torch.randn(2, n, *spatial, generator=g),
              torch.randint(0, 3, (2, n, *spatial), generator=g).float()):  # many ties
        x = x.clone()
        x.view(-1)[:: 7] = float("nan")  # NaN in every channel somewhere, also after a larger value
        assert torch.equal(channel_argmax(x), x.argmax(dim=1))
        labels = x.argmax(dim=1)
        assert present_labels(labels, n) == torch.unique(labels).tolist()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("frozen", [True, False])
def test_argmax_region_holds_labels_only_and_gives_the_float_multiplys_bits(dims, frozen):
    """The region is kept (and saved for the backward) as its labels, not as a float one-hot (4 bytes a
    voxel and class on a whole scan). Scores and gradients are bitwise those of the multiply by the
    float one-hot, signed zeros included."""
    out = seg_output(dims) * 3.0
    t = ArgmaxRegionTarget(frozen=frozen)
    t.prepare(out.detach())
    onehot = torch.nn.functional.one_hot(out.detach().argmax(1), 3).movedim(-1, 1).float()
    assert torch.equal(t.onehot, onehot.bool())
    ref_leaf = out.detach().clone().requires_grad_(True)
    ref = (ref_leaf * onehot).flatten(2).sum(-1)
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    (g_ref,) = torch.autograd.grad(ref, ref_leaf, upstream)
    leaf = out.detach().clone().requires_grad_(True)
    saved: list[torch.dtype] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.dtype) or s, lambda s: s):
        ours = t(leaf)
    (g,) = torch.autograd.grad(ours, leaf, upstream)
    bits = lambda v: v.view(torch.int32)  # noqa: E731  (torch.equal takes -0.0 for 0.0)
    assert torch.equal(bits(ours), bits(ref)) and torch.equal(bits(g), bits(g_ref))
    assert bool((g < 0).any()) and bool((bits(g) == bits(torch.tensor(-0.0))).any())  # signed zeros met
    # what the graph keeps for the backward: the labels (uint8 when frozen), no one-hot
    assert saved == [torch.uint8 if frozen else torch.int64]
