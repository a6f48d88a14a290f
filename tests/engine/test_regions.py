"""Outcome targets (TP/FP/FN against a ground truth) and one map per connected structure, 2D and 3D."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import ExecutionConfig, MethodConfig, TargetConfig, parse_config
from esegeta_engine.errors import VolumeError
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.io import Volume
from esegeta_engine.pipeline import run
from esegeta_engine.regions import (ComponentsTarget, OutcomeTarget, connected_components, expand_components,
                                    load_ground_truth)
from esegeta_engine.targets import ArgmaxRegionTarget, OtsuThresholdTarget

SHAPE = {2: (12, 12), 3: (10, 10, 8)}


class Threshold(nn.Module):
    """Class 1 logit = 4 (x - 0.5), class 0 = -class 1: predicts the structure where x > 0.5."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-4.0, 4.0]).view(2, 1, *([1] * dims)))
            self.conv.bias.copy_(torch.tensor([2.0, -2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Blur(nn.Module):
    """3x3 mean, ReLU, then the threshold head: a non-linear net whose gradients cross patches."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.blur = conv(1, 2, 3, padding=1)
        with torch.no_grad():
            self.blur.weight.fill_(1.0 / 3 ** dims)
            self.blur.weight[1] *= 2.0
            self.blur.bias.zero_()
        self.relu = nn.ReLU()
        self.head = conv(2, 2, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-4.0, 1.0], [4.0, -1.0]]).view(2, 2, *([1] * dims)))
            self.head.bias.copy_(torch.tensor([1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.blur(x)))


def box(dims: int, start: int, size: int = 3) -> tuple[slice, ...]:
    return tuple(slice(start, start + size) for _ in range(dims - 1)) + (slice(1, 1 + size),)


def phantom(dims: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Image with a found structure A, a missed one B (too dim) and an added one C (not in the truth)."""
    img = np.zeros(SHAPE[dims], np.float32)
    gt = np.zeros(SHAPE[dims], np.int64)
    a, b, c = box(dims, 0), box(dims, 4), (slice(8, 11),) * (dims - 1) + (slice(5, 7),)
    img[a], img[b], img[c] = 1.0, 0.3, 1.0
    gt[a], gt[b] = 1, 1
    masks = {k: np.zeros(SHAPE[dims], bool) for k in ("tp", "fp", "fn")}
    masks["tp"][a], masks["fn"][b], masks["fp"][c] = True, True, True
    return img, gt, masks


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("outcome", ["tp", "fp", "fn"])
def test_outcome_regions_are_exact(dims, outcome):
    img, gt, masks = phantom(dims)
    out = Threshold(dims)(torch.from_numpy(img)[None, None])
    t = OutcomeTarget(gt, outcome)
    t.prepare(out.detach())
    assert np.array_equal(t.region(1)[0].numpy(), masks[outcome])
    assert t.default_classes(out) == [1]
    scores = t(out)
    assert torch.isclose(scores[0, 1], out.detach()[0, 1][torch.from_numpy(masks[outcome])].sum())


@pytest.mark.parametrize("dims", [2, 3])
def test_binary_model_outcomes_use_the_logit_sign(dims):
    img, gt, masks = phantom(dims)
    out = Threshold(dims)(torch.from_numpy(img)[None, None])[:, 1:]  # one channel
    for outcome in ("tp", "fp", "fn"):
        t = OutcomeTarget(gt * 3, outcome)  # any non-zero label is the structure
        t.prepare(out.detach())
        assert np.array_equal(t.region(0)[0].numpy(), masks[outcome])


def _volume(arr: np.ndarray, affine=None) -> Volume:
    return Volume(arr, np.diag([0.8, 0.9, 1.5, 1.0]) if affine is None else affine)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("patchwise", [False, True])
def test_fn_saliency_lies_in_the_missed_structure(dims, patchwise):
    img, gt, masks = phantom(dims)
    execution = ExecutionConfig(patch_size=[4] * dims, mode="sliding_window") if patchwise else None
    ex = Explainer(Threshold(dims), target=TargetConfig(kind="outcome", outcome="fn"),
                   preprocess=_pre(dims), execution=execution)
    events = list(ex.iter_explain([_volume(img)], [MethodConfig(name="saliency")], roi_mask=gt,
                                  threaded=False))
    maps = [e for e in events if isinstance(e, MapReady)]
    assert len(maps) == 1 and maps[0].job.cls_label == "outcome-fn-class1"
    m = np.abs(maps[0].array)
    assert (m[masks["fn"]] > 0).all()  # the 1x1 model's gradient is 4 on every missed voxel
    assert np.allclose(m[masks["fn"]], 4.0, atol=1e-5) and m[~masks["fn"]].max() == 0
    if patchwise:  # patches that do not touch the missed structure are skipped
        assert 0 < maps[0].patch_evaluations < 2 * _n_patches(SHAPE[dims], 4)


def _n_patches(shape, p, overlap=0.25):
    step = max(int(p * (1 - overlap)), 1)
    return int(np.prod([len(range(0, s - p + step, step)) if s > p else 1 for s in shape]))


def _pre(dims):
    from esegeta_engine.config import PreprocessConfig

    return PreprocessConfig(spatial_dims=dims)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "occlusion"])
def test_outcome_target_runs_every_kind_of_method(dims, method):
    img, gt, masks = phantom(dims)
    params = {"window": 2} if method == "occlusion" else {}
    ex = Explainer(Threshold(dims), target=TargetConfig(kind="outcome", outcome="fp"), preprocess=_pre(dims))
    maps = [e for e in ex.iter_explain([_volume(img)], [MethodConfig(name=method, params=params)],
                                       roi_mask=gt, threaded=False) if isinstance(e, MapReady)]
    assert len(maps) == 1
    assert np.abs(maps[0].array[masks["fp"]]).sum() > 0


def three_structures(dims: int) -> np.ndarray:
    img = np.zeros(SHAPE[dims], np.float32)
    img[box(dims, 0, 2)] = 1.0        # 2**dims voxels ... smallest
    img[box(dims, 4, 3)] = 1.0        # largest
    img[(slice(8, 11),) * (dims - 1) + (slice(5, 7),)] = 0.9
    return img


@pytest.mark.parametrize("dims", [2, 3])
def test_components_are_26_or_8_connected_largest_first(dims):
    m = np.zeros(SHAPE[dims], bool)
    m[(0,) * dims] = True
    m[(1,) * dims] = True            # diagonal neighbour: same structure
    m[(5,) * dims] = True
    comps = connected_components(m)
    assert [int(c.sum()) for c in comps] == [2, 1]
    assert len(connected_components(m, min_voxels=2)) == 1
    assert len(connected_components(m, max_components=1)) == 1


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", ["argmax", "otsu", "outcome"])
def test_three_structures_give_three_targets_summing_to_the_class(dims, kind):
    img = three_structures(dims)
    x = torch.from_numpy(img)[None, None]
    net = Threshold(dims)
    out = net(x)
    if kind == "argmax":
        parent, cls = ArgmaxRegionTarget("softmax"), 1
    elif kind == "otsu":
        parent, cls = OtsuThresholdTarget("sigmoid", channel=1), 1
    else:
        parent, cls = OutcomeTarget(np.zeros_like(img, dtype=np.int64), "fp"), 1
    parent.prepare(out.detach())
    comp = expand_components(parent, out.detach(), [cls])
    assert isinstance(comp, ComponentsTarget) and len(comp.components) == 3
    sizes = [c.voxels for c in comp.components]
    assert sizes == sorted(sizes, reverse=True)
    assert comp.class_label(0).endswith("__component-01")
    xg = x.clone().requires_grad_(True)
    scores = comp(net(xg))
    assert torch.isclose(scores[0].sum(), parent(net(xg))[0, cls], rtol=1e-5)
    # additive methods: the component maps (gradients) sum to the class map
    grads = [torch.autograd.grad(comp(net(xg))[0, j], xg)[0] for j in range(3)]
    (whole,) = torch.autograd.grad(parent(net(xg))[0, cls], xg)
    assert torch.allclose(sum(grads), whole, atol=1e-6)


def _write(tmp_path, dims, img, gt=None, affine=None):
    affine = np.diag([0.8, 0.9, 1.5, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(img, affine), tmp_path / "vol.nii.gz")
    if gt is not None:
        nib.save(nib.Nifti1Image(gt.astype(np.uint8), affine), tmp_path / "gt.nii.gz")
    net = torch.jit.script(Threshold(dims).eval())
    net.save(str(tmp_path / "net.pt"))


@pytest.mark.parametrize("dims", [2, 3])
def test_component_maps_sum_to_the_class_map_through_a_run(tmp_path, dims):
    img = three_structures(dims)
    _write(tmp_path, dims, img)
    base = {"model": {"path": "net.pt"}, "volumes": ["vol.nii.gz"], "preprocess": {"spatial_dims": dims},
            "methods": [{"name": "input_x_gradient"}], "evaluation": {"axioms": None}}
    whole = run(parse_config({**base, "target": {"kind": "argmax", "classes": [1]},
                              "output": {"dir": "whole"}}, base=tmp_path))
    parts = run(parse_config({**base, "target": {"kind": "argmax", "classes": [1], "components": True},
                              "output": {"dir": "parts"}}, base=tmp_path))
    recs = [r for r in parts.records if r["status"] == "ok"]
    assert [r["target"] for r in recs] == [f"argmax-class1__component-{k:02d}" for k in (1, 2, 3)]
    assert all(r["file"].endswith(f"__component-{k:02d}.nii.gz") for k, r in zip((1, 2, 3), recs))
    details = [r["target_details"] for r in recs]
    assert [d["voxels"] for d in details] == sorted((d["voxels"] for d in details), reverse=True)
    assert all(len(d["centroid_mm"]) == 3 and len(d["centroid_voxel"]) == dims for d in details)
    total = sum(np.asarray(nib.load(str(parts.out_dir / r["file"])).dataobj) for r in recs)
    ref = np.asarray(nib.load(str(whole.out_dir / whole.records[0]["file"])).dataobj)
    assert np.allclose(total, ref, atol=1e-5) and np.abs(ref).sum() > 0
    # the centroid of the largest (3-wide box at 4..6, z 1..3) in voxels and mm
    assert np.allclose(details[0]["centroid_voxel"], [5.0] * (dims - 1) + [2.0])
    assert np.isclose(details[0]["centroid_mm"][0], 5.0 * 0.8)
    manifest = json.loads((parts.out_dir / "manifest.json").read_text())
    assert manifest["results"][0]["target_details"]["component"] == 1


@pytest.mark.parametrize("dims", [2, 3])
def test_outcome_run_reads_the_ground_truth_and_reorients_it(tmp_path, dims):
    img, gt, masks = phantom(dims)
    flip = np.diag([-0.8, 0.9, 1.5, 1.0])
    flip[0, 3] = 10.0
    _write(tmp_path, dims, img, gt, affine=flip)
    res = run(parse_config({"model": {"path": "net.pt"}, "volumes": ["vol.nii.gz"],
                            "preprocess": {"spatial_dims": dims, "orientation": "RAS"[:dims]},
                            "target": {"kind": "outcome", "ground_truth": "gt.nii.gz", "outcome": "fn",
                                       "components": True},
                            "methods": [{"name": "saliency"}], "evaluation": {"axioms": None}}, base=tmp_path))
    (rec,) = res.records
    arr = np.asarray(nib.load(str(res.out_dir / rec["file"])).dataobj)
    assert rec["target"] == "outcome-fn-class1__component-01"
    assert (np.abs(arr[masks["fn"]]) > 0).all() and np.abs(arr[~masks["fn"]]).max() == 0


def test_ground_truth_off_the_grid_is_one_clear_error(tmp_path):
    img, gt, _ = phantom(3)
    _write(tmp_path, 3, img, gt)
    nib.save(nib.Nifti1Image(gt.astype(np.uint8), np.eye(4)), tmp_path / "gt_other.nii.gz")
    vol = Volume(img, np.diag([0.8, 0.9, 1.5, 1.0]), path=tmp_path / "vol.nii.gz")
    with pytest.raises(VolumeError, match="different geometry.*|affines differ"):
        load_ground_truth(tmp_path / "gt_other.nii.gz", [vol], 3)
    nib.save(nib.Nifti1Image(gt[:5].astype(np.uint8), np.diag([0.8, 0.9, 1.5, 1.0])), tmp_path / "gt_s.nii.gz")
    with pytest.raises(VolumeError, match="has shape"):
        load_ground_truth(tmp_path / "gt_s.nii.gz", [vol], 3)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("patchwise", [False, True])
@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_shared_forward_gives_each_component_its_separate_map(dims, patchwise, method):
    net = Blur(dims)
    img = three_structures(dims)
    img[box(dims, 0, 3)] = 1.0  # big enough to survive the blur
    execution = ExecutionConfig(patch_size=[6] * dims, mode="sliding_window") if patchwise else None
    ex = Explainer(net, target=TargetConfig(kind="argmax", activation="softmax", components=True,
                                            classes=[1], max_components=3),
                   preprocess=_pre(dims), execution=execution)
    maps = [e for e in ex.iter_explain([_volume(img)], [MethodConfig(name=method)], threaded=False)
            if isinstance(e, MapReady)]
    assert len(maps) >= 2
    assert maps[0].evaluations == 1 and all(m.evaluations == 0 for m in maps[1:])
    assert "shared forward" in maps[0].notes[0]
    # reference: each component alone, through Captum (the method's own code path)
    from esegeta_engine.methods import MethodContext, attribute, get_method
    from esegeta_engine.regions import ComponentsTarget

    x = ex.prepare_input(_volume(img))
    out = ex.raw_output(x)
    parent = ArgmaxRegionTarget("softmax")
    parent.prepare(out)
    comp = expand_components(parent, out, [1], max_components=3)
    assert isinstance(comp, ComponentsTarget)
    for j, m in enumerate(maps):
        sm = ex.make_score_model(comp, x, support=comp.support(j))
        ref = attribute(get_method(method), MethodContext(score_model=sm, inputs=x, target=j),
                        get_method(method).resolve_params({}))
        ref_nifti = ex.geometry(_volume(img)).to_nifti(ref[0].sum(0).numpy())
        assert np.allclose(m.array, ref_nifti, atol=1e-6), j
        assert np.abs(m.array).sum() > 0


@pytest.mark.parametrize("cls", [256, -255, 2])
def test_a_class_out_of_range_is_refused_not_wrapped_onto_another(cls):
    """The frozen region's labels are uint8: ``region == 256`` would match class 0 and ``-255`` class 1."""
    from esegeta_engine.errors import TargetError
    from esegeta_engine.evaluation.calibration import target_region
    from esegeta_engine.regions import region_of
    from esegeta_engine.targets import ArgmaxRegionTarget

    t = ArgmaxRegionTarget()
    t.prepare(torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(TargetError, match="do not exist"):
        region_of(t, cls)
    region = target_region(t, cls, (8, 8, 8))
    assert region is not None and not region.any()  # no voxel of any class is taken for it
    assert region_of(t, 1).sum() + region_of(t, 0).sum() == 8 ** 3
