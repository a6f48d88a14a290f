"""The Model tab's folders: nnU-Net results folders and MONAI bundles through the engine's sources."""

from __future__ import annotations

import json

import pytest
import torch

from esegeta_engine.errors import BundleTrustError, ModelLoadError
from napari_esegeta import _model as M


def _bundle(tmp_path, marker):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.save({}, root / "models" / "model.pt")
    (root / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "BasicUNet"}, "x": f"$open({str(marker)!r}, 'w').write('ran')"}))
    return root


def test_bundle_folder_asks_for_trust_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    req = M.ModelRequest(path=str(_bundle(tmp_path, marker)))
    with pytest.raises(BundleTrustError, match="would run Python"):
        M.load_request_pair(req)
    assert not marker.exists()


def test_a_folder_of_another_kind_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an nnU-Net results folder .* nor a MONAI bundle"):
        M.load_request_pair(M.ModelRequest(path=str(tmp_path)))
