"""Model sources: the registry, config keys and CLI flags, predict on a model file, bundle trust."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.cli import main
from esegeta_engine.config import ModelConfig, parse_config
from esegeta_engine.errors import ConfigError, ModelLoadError
from esegeta_engine.models import Trust, detect_source, load_source, sources


def _unet_file(tmp_path):
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    net = TinySegNet(dims=3).eval()
    path = tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    return net, path


def test_registry_names_every_source():
    assert {"file", "nnunet", "bundle"} <= set(sources())


def test_config_takes_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one of model.path"):
        ModelConfig()
    with pytest.raises(ValueError, match="got path, nnunet"):
        ModelConfig(path=tmp_path / "a.pt", nnunet=tmp_path)
    with pytest.raises(ValueError, match="--trust-bundle"):
        ModelConfig(bundle=tmp_path, trust_bundle=True)
    cfg = ModelConfig(nnunet=tmp_path, folds="all", mirroring=False)
    assert cfg.folds == "all" and cfg.configuration == "3d_fullres" and cfg.checkpoint == "checkpoint_final.pth"


def test_file_source_loads_and_describes(tmp_path):
    net, path = _unet_file(tmp_path)
    loaded = load_source(ModelConfig(path=path))
    assert loaded.source == "torchscript" and loaded.description["path"] == str(path)
    x = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(loaded.module(x), net(x))


def test_predict_writes_probabilities_of_a_model_file(tmp_path):
    net, path = _unet_file(tmp_path)
    affine = np.array([[0.8, 0.1, 0, 3], [0, 1.1, 0, -2], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(size=(10, 9, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    assert main(["predict", "--model", str(path), "--volume", str(tmp_path / "v.nii.gz"),
                 "--out", str(tmp_path / "p")]) == 0
    probs = nib.load(tmp_path / "p" / "v__probabilities.nii.gz")
    assert probs.shape == (10, 9, 8, 2) and probs.get_data_dtype() == np.float32
    assert np.allclose(probs.affine, affine)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(data)[None, None]), 1)[0].numpy()
    np.testing.assert_allclose(np.moveaxis(probs.get_fdata(), -1, 0), expected, atol=1e-6)
    labels = nib.load(tmp_path / "p" / "v__prediction.nii.gz").get_fdata()
    np.testing.assert_array_equal(labels, expected.argmax(0))
    info = json.loads((tmp_path / "p" / "prediction.json").read_text())
    assert info["volumes"][0]["probabilities_from"].startswith("softmax")


def test_run_config_writes_probabilities_next_to_the_label_map(tmp_path):
    _, path = _unet_file(tmp_path)
    data = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "v.nii.gz")
    from esegeta_engine.pipeline import run

    cfg = parse_config({"model": {"path": str(path)}, "volumes": [str(tmp_path / "v.nii.gz")],
                        "methods": [{"name": "saliency"}], "target": {"classes": [1]},
                        "output": {"dir": str(tmp_path / "out"), "probabilities": True}}, base=tmp_path)
    res = run(cfg)
    manifest = json.loads(res.manifest_path.read_text())
    assert manifest["volumes"][0]["probabilities"] == "v__probabilities.nii.gz"
    assert manifest["model"]["source"] == "torchscript"
    assert nib.load(tmp_path / "out" / "v__probabilities.nii.gz").shape == (8, 8, 8, 2)


def test_cli_wants_one_model(tmp_path, capsys):
    assert main(["predict", "--volume", "v.nii.gz"]) == 2
    assert "give one model" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="neither an nnU-Net results folder"):
        from argparse import Namespace

        from esegeta_engine.cli_sources import model_section

        model_section(Namespace(model=str(tmp_path), nnunet=None, bundle=None))


# -- MONAI bundles: nothing runs unasked ------------------------------------------------------

def _bundle(tmp_path, config: dict, weights: bool = True):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    if weights:
        torch.save({}, root / "models" / "model.pt")
    return root


@pytest.mark.parametrize("hostile", ["expression", "target"])
def test_hostile_bundle_is_refused_without_trust_and_nothing_runs(tmp_path, capsys, hostile):
    marker = tmp_path / "marker.txt"
    code = f"$open({str(marker)!r}, 'w').write('ran')"
    config = {"network_def": {"_target_": "BasicUNet", "spatial_dims": 3},
              "trigger": code if hostile == "expression" else
              {"_target_": "pathlib.Path.write_text", "self": str(marker), "data": "ran"}}
    root = _bundle(tmp_path, config)
    assert detect_source(root) == "bundle"
    with pytest.raises(ModelLoadError, match="would run Python.*_target_"):
        load_source(ModelConfig(bundle=root))
    rc = main(["explain", "--bundle", str(root), "--volume", str(tmp_path / "v.nii.gz"), "--method", "saliency",
               "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "would run Python" in err and "--trust-bundle" in err and len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_bundle_without_network_def_or_weights(tmp_path):
    root = _bundle(tmp_path, {"inferer": {}})
    with pytest.raises(ModelLoadError, match="has no 'network_def'"):
        load_source(ModelConfig(bundle=root))
    root2 = _bundle(tmp_path / "b2", {"network_def": {}}, weights=False)
    with pytest.raises(ModelLoadError, match="models/model.pt does not exist"):
        load_source(ModelConfig(bundle=root2))


def test_trusted_bundle_is_parsed_by_monai_and_its_weights_checked(tmp_path):
    # the deployed pipeline itself is tested in test_models_bundle.py
    root = _bundle(tmp_path, {"network_def": {"_target_": "BasicUNet"}})
    with pytest.raises(ModelLoadError, match="weights in .*model.pt do not fit network_def"):
        load_source(ModelConfig(bundle=root), Trust(bundle=True))
