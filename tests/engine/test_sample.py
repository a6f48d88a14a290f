"""Tests of the embedded sample: phantoms, networks and the shipped weights."""

from __future__ import annotations

import importlib
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from esegeta_engine.sample import (
    TinyClassifier2D,
    UNet,
    classifier_paths,
    load_sample_classifier,
    load_sample_unet,
    make_phantom,
    make_phantom_2d,
    minmax_normalise,
    predict_mask,
    sample_info,
    save_phantom_nifti,
    unet_paths,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

FRESH_SEED = 12345  # not in the training seed ranges recorded in sample_info.json
CLS_TEST_SEEDS = range(5000, 5050)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def fresh():
    return make_phantom(seed=FRESH_SEED)


@pytest.fixture(scope="module")
def unet_state():
    return load_sample_unet("state")


@pytest.fixture(scope="module")
def unet_script():
    return load_sample_unet("torchscript")


# --------------------------------------------------------------------- phantoms


def test_phantom_deterministic_and_seed_dependent():
    a, b, c = make_phantom(seed=3), make_phantom(seed=3), make_phantom(seed=4)
    np.testing.assert_array_equal(a.volume, b.volume)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.volume, c.volume)
    assert not np.array_equal(a.mask, c.mask)


def test_phantom_content(fresh):
    assert fresh.volume.shape == fresh.mask.shape == (64, 64, 64)
    assert fresh.volume.dtype == np.float32 and fresh.mask.dtype == np.uint8
    assert set(np.unique(fresh.mask)) == {0, 1}
    vessel = fresh.mask.astype(bool)
    assert 0.002 < vessel.mean() < 0.1
    brain = (fresh.volume > 0.15) & ~vessel
    assert fresh.volume[vessel].mean() > 1.5 * fresh.volume[brain].mean()


def test_phantom_is_not_trivially_thresholdable(fresh):
    vol = minmax_normalise(fresh.volume)
    best = max(dice(vol > t, fresh.mask) for t in np.linspace(0.1, 0.9, 41))
    assert best < 0.9


def test_affine_realistic(fresh):
    aff = fresh.affine
    assert aff.shape == (4, 4) and aff.dtype == np.float64
    assert not np.allclose(aff, np.eye(4))
    assert np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3])))  # axis-aligned
    assert np.any(np.diag(aff)[:3] < 0)  # flipped axis
    assert np.allclose(np.abs(np.diag(aff)[:3]), [0.4, 0.4, 0.6])
    assert np.any(aff[:3, 3] != 0)


def test_save_phantom_nifti_roundtrip(tmp_path):
    vol_path, mask_path = save_phantom_nifti(tmp_path, seed=7, shape=(32, 32, 16))
    ref = make_phantom(shape=(32, 32, 16), seed=7)
    for path, data in ((vol_path, ref.volume), (mask_path, ref.mask)):
        img = nib.load(path)
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
        np.testing.assert_allclose(img.get_qform(), ref.affine, atol=1e-5)
        np.testing.assert_allclose(img.get_sform(), ref.affine, atol=1e-5)
        assert img.header.get_xyzt_units()[0] == "mm"
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    assert vol_path.name == "phantom_volume.nii.gz" and mask_path.name == "phantom_mask.nii.gz"


def test_phantom_2d():
    pos = make_phantom_2d(seed=1, has_vessel=True)
    neg = make_phantom_2d(seed=1, has_vessel=False)
    assert pos.label == 1 and pos.mask.sum() > 0
    assert neg.label == 0 and neg.mask.sum() == 0
    assert pos.image.shape == (64, 64) and pos.image.dtype == np.float32
    assert pos.affine.shape == (4, 4) and not np.allclose(pos.affine, np.eye(4))
    again = make_phantom_2d(seed=1, has_vessel=True)
    np.testing.assert_array_equal(pos.image, again.image)
    labels = {make_phantom_2d(seed=s).label for s in range(20)}
    assert labels == {0, 1}


# ---------------------------------------------------------------- shipped models


def test_sample_files_and_info():
    info = sample_info()
    assert info["preprocess"]["normalisation"] == "minmax"
    assert info["preprocess"]["axis_order"] == "xyz"
    for paths in (unet_paths(), classifier_paths()):
        assert set(paths) == {"state", "torchscript"}
        for path in paths.values():
            assert path.is_file() and path.stat().st_size < 5_000_000
    for entry in info["models"].values():
        module, _, name = entry["class_path"].partition(":")
        assert issubclass(getattr(importlib.import_module(module), name), nn.Module)
    unet = info["models"]["unet3d_vessels"]
    lo, hi = unet["training"]["phantom_seeds"]
    assert not lo <= FRESH_SEED < hi
    assert unet["evaluation"]["mean"] >= 0.8
    assert info["models"]["classifier2d"]["evaluation"]["accuracy"] >= 0.85


@pytest.fixture(scope="module")
def unet_logits(fresh, unet_state, unet_script):
    """Logits of the shipped U-Net (state dict and TorchScript) on the fresh phantom."""
    x = torch.from_numpy(minmax_normalise(fresh.volume))[None, None]
    with torch.no_grad():
        return unet_state(x), unet_script(x)


def test_unet_dice_on_fresh_phantom(fresh, unet_state, unet_logits):
    assert isinstance(unet_state, UNet) and not unet_state.training
    for logits in unet_logits:
        assert logits.shape == (1, 2, 64, 64, 64)
        assert dice(logits.argmax(1)[0].numpy(), fresh.mask) >= 0.8


def test_unet_torchscript_matches_state_dict(unet_logits):
    torch.testing.assert_close(*unet_logits, rtol=1e-4, atol=1e-4)


def test_predict_mask():
    torch.manual_seed(0)
    model = UNet(spatial_dims=2, features=(4, 8)).eval()
    image = np.random.default_rng(0).random((16, 12)).astype(np.float32) * 100
    pred = predict_mask(model, image)
    assert pred.shape == image.shape and pred.dtype == np.uint8
    x = torch.from_numpy(minmax_normalise(image))[None, None]
    with torch.no_grad():
        np.testing.assert_array_equal(pred, model(x).argmax(1)[0].numpy())


def test_classifier_accuracy_and_torchscript():
    phantoms = [make_phantom_2d(seed=s) for s in CLS_TEST_SEEDS]
    x = torch.from_numpy(np.stack([minmax_normalise(p.image) for p in phantoms])[:, None])
    y = torch.tensor([p.label for p in phantoms])
    assert 0 < int(y.sum()) < len(y)
    state, script = load_sample_classifier("state"), load_sample_classifier("torchscript")
    with torch.no_grad():
        logits, logits_script = state(x), script(x)
    assert logits.shape == (len(y), 2)
    assert (logits.argmax(1) == y).float().mean().item() >= 0.85
    torch.testing.assert_close(logits, logits_script, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- networks


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_2d_3d_and_scriptable(dims):
    torch.manual_seed(0)
    model = UNet(spatial_dims=dims, features=(4, 8, 16)).eval()
    x = torch.rand(2, 1, *([16] * dims))
    with torch.no_grad():
        out = model(x)
        scripted = torch.jit.script(model)(x)
    assert out.shape == (2, 2, *([16] * dims))
    torch.testing.assert_close(out, scripted)


def test_unet_rejects_bad_size():
    with pytest.raises(ValueError, match="multiple of 4"):
        UNet(spatial_dims=2)(torch.rand(1, 1, 18, 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        UNet(spatial_dims=3, features=(4, 8, 8, 8))(torch.rand(1, 1, 8, 8, 12))
    with pytest.raises(ValueError):
        UNet(spatial_dims=4)


def test_tiny_classifier_scriptable():
    model = TinyClassifier2D().eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.jit.script(model)(x))
    assert model(x).shape == (3, 2)


class _CountReLU(TorchFunctionMode):
    """Count every relu call, functional or through ``nn.ReLU``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.relu, torch.relu, torch.relu_, F.relu_, torch.Tensor.relu):
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (UNet(spatial_dims=3, features=(4, 8, 16)), (1, 1, 8, 8, 8)),
        (UNet(spatial_dims=2), (1, 1, 16, 16)),
        (TinyClassifier2D(), (1, 1, 16, 16)),
    ],
)
def test_each_module_runs_once_and_relus_are_modules(model, shape):
    all_modules = list(model.named_modules(remove_duplicate=False))
    assert len({id(m) for _, m in all_modules}) == len(all_modules)  # no shared instances
    leaves = [m for _, m in all_modules if not list(m.children())]
    relus = [m for m in leaves if isinstance(m, nn.ReLU)]
    assert relus and all(not r.inplace for r in relus)
    counts: Counter[int] = Counter()
    hooks = [m.register_forward_hook(lambda mod, i, o: counts.update([id(mod)])) for m in leaves]
    try:
        with torch.no_grad(), _CountReLU() as mode:
            model.eval()(torch.rand(*shape))
    finally:
        for h in hooks:
            h.remove()
    assert all(counts[id(m)] == 1 for m in leaves)
    assert mode.calls == len(relus)  # no functional relu outside nn.ReLU modules
