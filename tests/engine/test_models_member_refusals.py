"""DeepLIFT's family through a deployed pipeline: refused before any model evaluation, with the real reason.

DeepLIFT's rules need a reference pass of the baseline beside the input's. Through nnU-Net's pipeline the
patch-wise backward recomputes every member with the rules already applying (and a non-zero baseline moves
the crop box); through a bundle's sliding window every patch is recomputed the same way. Each is refused
up front (0 model evaluations for the job) with that reason and what to use instead.
"""

from __future__ import annotations

import json

import nibabel as nib
import pytest

pytest.importorskip("nnunetv2")

import bundle_setup as B  # noqa: E402
import nnunet_setup as S  # noqa: E402

from esegeta_engine.config import ModelConfig, parse_config  # noqa: E402
from esegeta_engine.models import Trust, load_source  # noqa: E402
from esegeta_engine.pipeline import run  # noqa: E402

FAMILY = [{"name": "deeplift"}, {"name": "deeplift_shap"}, {"name": "layer_deeplift", "layers": ["network_input"]},
          {"name": "layer_deeplift_shap", "layers": ["network_input"]}]


def _refused(manifest_path, expected):
    manifest = json.loads(manifest_path.read_text())
    records = {r["method"]: r for r in manifest["results"]}
    assert set(records) == expected
    for rec in records.values():
        assert rec["status"] == "failed"
        assert rec["model_evaluations"] == 0  # refused before the method evaluated anything
        assert "reference pass of the baseline" in rec["error"] and "integrated_gradients" in rec["error"]
        assert "different paths" not in rec["error"]
    return records


def test_deeplift_family_through_nnunet_is_refused_up_front(nnunet_folder, tmp_path):
    img, _ = S.scan((16, 12, 8), (1.0, 1.0, 2.0), seed=5)
    path = tmp_path / "scan.nii.gz"
    nib.save(img, path)
    cfg = parse_config({
        "model": {"nnunet": str(nnunet_folder), "folds": [0]}, "volumes": [str(path)], "target": {"classes": [1]},
        "methods": [*FAMILY, {"name": "layer_deeplift", "layers": ["folds.0.encoder.stages.1"]}],
        "output": {"dir": str(tmp_path / "out")}}, base=tmp_path)
    records = _refused(run(cfg).manifest_path, {"deeplift", "deeplift_shap", "layer_deeplift",
                                                "layer_deeplift_shap"})
    assert "crop box" in records["deeplift"]["error"] and "mirrored copy" in records["deeplift"]["error"]


def test_deeplift_family_through_a_bundles_sliding_window_is_refused_up_front(tmp_path):
    root = B.write_bundle(tmp_path / "bundle")
    scan = B.oblique_scan(tmp_path / "scan.nii.gz")
    cfg = parse_config({"model": {"bundle": str(root)}, "volumes": [str(scan)], "target": {"classes": [1]},
                        "methods": FAMILY, "output": {"dir": str(tmp_path / "out")}}, base=tmp_path)
    records = _refused(run(cfg, trust_bundle=True).manifest_path, {m["name"] for m in FAMILY})
    assert "SlidingWindowInferer" in records["deeplift"]["error"]


def test_other_methods_and_a_simple_inferer_are_not_refused(nnunet_folder, tmp_path):
    pipe = load_source(ModelConfig(nnunet=nnunet_folder, folds=[0])).module
    assert all(pipe.method_refusal(m) is None for m in ("saliency", "integrated_gradients", "occlusion"))
    root = B.write_bundle(tmp_path / "simple", B.config(inferer={"_target_": "SimpleInferer"}))
    simple = load_source(ModelConfig(bundle=root), Trust(bundle=True)).module
    assert simple.method_refusal("deeplift") is None  # one graph of the whole pipeline: DeepLIFT's own batch
