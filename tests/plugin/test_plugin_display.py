"""Map styling, orientation letters, class names and run cost, as plain functions (no viewer)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from esegeta_engine.errors import TargetError
from napari_esegeta import _cost
from napari_esegeta._layers import (
    diverging_colormap,
    result_layer_data,
    sequential_colormap,
    support_limit,
)
from napari_esegeta._run import class_label, named_message, parse_classes
from napari_esegeta._view import axis_codes, orientation_letters


def test_support_limit_ignores_the_near_zero_rest_of_the_volume() -> None:
    """A sparse map (1,000 strong voxels in 10^6): the limit comes from the strong ones."""
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 1e-4, size=(100, 100, 100)).astype(np.float32)  # noise floor
    strong = rng.uniform(1.0, 10.0, size=1000).astype(np.float32)
    arr.ravel()[rng.choice(arr.size, 1000, replace=False)] = strong
    whole_volume = np.percentile(np.abs(arr), 99.5)  # the old limit: noise-level, saturates everything
    assert whole_volume < 1e-3
    np.testing.assert_allclose(support_limit(arr), np.percentile(strong, 99.0), rtol=1e-5)
    assert support_limit(np.zeros((4, 4))) == 1.0
    assert support_limit(np.array([0.0, 0.0, 3.0])) == pytest.approx(3.0)


def test_signed_map_is_diverging_centred_on_zero_and_transparent_there() -> None:
    arr = np.linspace(-2.0, 1.0, 64, dtype=np.float32).reshape(4, 4, 4)
    _, kw, kind = result_layer_data(arr, method="m", method_label="m", target_label="t",
                                    provenance={}, geometry={})
    lo, hi = kw["contrast_limits"]
    assert kind == "image" and kw["colormap"] is diverging_colormap() and lo == -hi > -np.inf
    cmap = diverging_colormap()
    centre = cmap.map(np.array([(0.0 - lo) / (hi - lo)]))[0]
    assert centre[3] == pytest.approx(0.0)  # zero is see-through: the scan shows
    ends = cmap.map(np.array([0.0, 1.0]))
    assert np.all(ends[:, 3] == 1.0)
    assert ends[0, 2] > ends[0, 0] and ends[1, 0] > ends[1, 2]  # negative blue, positive red
    assert kw["blending"] == "translucent" and kw["rendering"] == "translucent"


def test_unsigned_map_low_end_is_transparent() -> None:
    arr = np.abs(np.linspace(0.0, 1.0, 64, dtype=np.float32)).reshape(4, 4, 4)
    _, kw, _ = result_layer_data(arr, method="m", method_label="m", target_label="t",
                                 provenance={}, geometry={})
    assert kw["colormap"] is sequential_colormap() and kw["contrast_limits"][0] == 0.0
    alpha = sequential_colormap().map(np.array([0.0, 0.05, 0.5, 1.0]))[:, 3]
    assert alpha[0] == 0.0 and alpha[1] == 0.0 and alpha[2] > 0.8 and alpha[3] == 1.0


@pytest.mark.parametrize(("displayed", "orient", "expected"), [
    ((1, 0), ("up", "left"), {"top_center": "A", "bottom_center": "P", "middle_left": "R", "middle_right": "L"}),
    ((2, 0), ("up", "left"), {"top_center": "S", "bottom_center": "I", "middle_left": "R", "middle_right": "L"}),
    ((2, 1), ("up", "left"), {"top_center": "S", "bottom_center": "I", "middle_left": "A", "middle_right": "P"}),
    ((1, 0), ("down", "right"), {"top_center": "P", "bottom_center": "A", "middle_left": "L",
                                 "middle_right": "R"}),
])
def test_orientation_letters_of_ras_world_views(displayed, orient, expected) -> None:
    """Radiological axial: patient's right on screen left, anterior up (world is RAS+)."""
    assert orientation_letters(displayed, orient) == expected


def test_axis_codes_follow_the_affine() -> None:
    assert axis_codes(np.diag([-1.0, 1.0, 1.0, 1.0])) == ("L", "A", "S")
    assert axis_codes(np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])) == ("P", "S", "R")


def test_classes_by_name_or_index() -> None:
    names = ("background", "vessel")
    assert parse_classes("vessel", names) == [1]
    assert parse_classes("Vessel, 0", names) == [1, 0]
    assert parse_classes("", names) is None
    assert parse_classes("1", ()) == [1]
    with pytest.raises(TargetError) as err:
        parse_classes("tumour", names)
    assert "tumour" in err.value.problem and "vessel (1)" in err.value.fix
    with pytest.raises(TargetError) as err:
        parse_classes("2", names)
    assert "2" in err.value.problem and "background (0)" in err.value.fix
    with pytest.raises(TargetError) as err:
        parse_classes("vessel", ())
    assert "Model tab" in err.value.fix
    assert class_label(1, "argmax-class1", names) == "vessel"
    assert class_label(1, "voxel-class1", names) == "voxel-vessel"
    assert class_label(1, "argmax-class1", ()) == "argmax-class1"
    assert class_label(5, "argmax-class5", names) == "argmax-class5"
    assert named_message("saliency · argmax-class1: 3 model evaluations", names) == \
        "saliency · vessel: 3 model evaluations"
    assert named_message("occlusion · voxel-class0: starting", names) == "occlusion · voxel-background: starting"


def test_rate_meter_total_and_eta() -> None:
    meter = _cost.RateMeter(start=100.0)
    ev = SimpleNamespace(evaluations=5, run_evaluations=40, run_expected=100)
    text = meter.text(ev, now=110.0)  # 40 evaluations in 10 s: 60 left take 15 s
    assert meter.eta(110.0) == pytest.approx(15.0)
    assert text == " · run 40/100 · ETA 15 s"
    # a run whose total is unknown (a method that cannot tell its cost): no total, no ETA
    meter = _cost.RateMeter(start=0.0)
    meter.update(SimpleNamespace(evaluations=4, run_evaluations=11, run_expected=None), now=1.0)
    assert meter.evaluations == 11 and meter.eta(1.0) is None
    assert meter.text(SimpleNamespace(evaluations=5, run_evaluations=12, run_expected=None), now=2.0) == ""


def test_cost_estimate_and_warning(monkeypatch) -> None:
    from esegeta_engine.explain import Explainer

    monkeypatch.setattr(Explainer, "estimate", lambda self, volumes, methods: 1234 * len(methods),
                        raising=False)
    assert _cost.estimate_evaluations(None, object(), ["a", "b"]) == 2468
    assert _cost.estimate_seconds(2468, 0.5) == pytest.approx(1234.0)
    assert _cost.too_long(2468, 1234.0, 120) and not _cost.too_long(10, 5.0, 120)
    assert _cost.too_long(_cost.WARN_EVALUATIONS + 1, None, 120)
    assert not _cost.too_long(None, None, 120)
    monkeypatch.delattr(Explainer, "estimate", raising=False)
    if not hasattr(Explainer, "estimate"):
        assert _cost.estimate_evaluations(None, object(), ["a"]) is None
    assert _cost.format_seconds(42) == "42 s" and _cost.format_seconds(185) == "3 min 05 s"
    assert _cost.format_seconds(3720) == "1 h 02 min"


def test_preferred_reader_is_written_once_and_keeps_a_user_choice() -> None:
    from napari.settings import get_settings

    from napari_esegeta._settings import ensure_preferred_reader

    plugins = get_settings().plugins
    plugins.extension2reader = {"*.nii": "someone-else"}
    assert ensure_preferred_reader() == ["*.nii.gz"]
    assert plugins.extension2reader == {"*.nii": "someone-else", "*.nii.gz": "napari-esegeta"}
    assert ensure_preferred_reader() == []


def test_default_layer_is_the_last_activation_before_the_head() -> None:
    """Grad-CAM's default layer on the bundled U-Net localises (issue 19.9): the decoder's last ReLU."""
    from napari_esegeta._model import default_layer

    unet = [("ups.1.block.conv2", "Conv3d"), ("ups.1.block.bn2", "BatchNorm3d"), ("ups.1.block.relu2", "ReLU"),
            ("head", "Conv3d")]
    assert default_layer(unet) == "ups.1.block.relu2"
    assert default_layer([("a", "Conv2d"), ("b", "Conv2d"), ("head", "Conv2d")]) == "b"  # no activations
    assert default_layer([("fc", "Linear"), ("act", "ReLU")]) == "act"  # no convolution: the last layer


def test_sliding_window_maps_carry_their_seam_strength_and_note() -> None:
    """Issue 19.3: the layer's record says how strongly the map shows the patch grid, and why."""
    from esegeta_engine.evaluation.seams import border_planes
    from napari_esegeta._run import seam_note

    shape = (24, 24, 16)
    a = np.ones(shape, np.float32)
    a[:, border_planes(shape, (8, 8, 8), 0.25)[1], :] = 2.0  # seams across y
    execution = {"mode": "sliding_window", "patch_size": [8, 8, 8], "overlap": 0.25, "blend": "gaussian"}
    strength, note = seam_note(a, execution, "xyz")
    assert strength["y"] == pytest.approx(2.0) and strength["x"] == pytest.approx(1.0)
    assert "seam strength" in note and "overlap 0.5" in note and "Patch grid" in note
    assert seam_note(a, {"mode": "whole", "precision": "fp32"}) is None
    strength, _ = seam_note(a, execution, "zyx")  # model axes (z, y, x): named by their NIfTI letters
    assert set(strength) == {"x", "y", "z"} and strength["y"] == pytest.approx(2.0)
