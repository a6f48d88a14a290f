"""Command-line messages name the command's own flags (issue 19.9)."""

from __future__ import annotations

import torch


def test_layers_without_a_class_names_the_class_path_flag(tmp_path, capsys) -> None:
    from esegeta_engine.cli import main
    from tiny_models import TinySegNet

    torch.save(TinySegNet(3).state_dict(), tmp_path / "net.pt")
    assert main(["layers", str(tmp_path / "net.pt")]) == 2
    err = capsys.readouterr().err
    assert "--class-path" in err and "model.class_path" not in err and "Traceback" not in err


def _volume(path, shape=(8, 8, 8)):
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape, dtype=np.float32), np.eye(4)), path)
    return path


def test_explain_names_its_flags_and_run_its_config_keys(tmp_path, capsys) -> None:
    from esegeta_engine.cli import main
    from tiny_models import TinySegNet

    torch.save(TinySegNet(3).state_dict(), tmp_path / "net.pt")
    vol = _volume(tmp_path / "v.nii.gz")
    assert main(["explain", "--model", str(tmp_path / "net.pt"), "--volume", str(vol), "--method", "saliency",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--class-path" in err and "--kwargs" in err and "model.class_path" not in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "c.yaml").write_text(f"model: {{path: {tmp_path / 'net.pt'}}}\nvolumes: [{vol}]\n"
                                     "methods: [{name: saliency}]\n")
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "model.class_path" in err and "--class-path" not in err  # a config's user fixes the config
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_config_keys_become_the_commands_flags_once() -> None:
    from esegeta_engine.cli import in_flags

    flags = frozenset({"--folds", "--checkpoint", "--nnunet"})
    assert in_flags("choose folds that were trained (model.folds) or another model.checkpoint", flags) == \
        "choose folds that were trained (--folds) or another --checkpoint"
    assert in_flags("point --nnunet / model.nnunet at the folder", flags) == "point --nnunet at the folder"
    assert in_flags("set model.configuration; execution.divisible_by", flags) == \
        "set model.configuration; execution.divisible_by"  # no such flag here: the key stays
    assert in_flags("fix: set model.folds: [0, 1] or model.checkpoint.", flags) == \
        "fix: set --folds [0, 1] or --checkpoint."
    assert in_flags("fix the keys above", flags) == "fix the flags above"
    assert in_flags("invalid command line:\n  model.folds: Input should be a list", flags) == \
        "invalid command line:\n  --folds: Input should be a list"


def test_verbose_after_the_command_too() -> None:
    from esegeta_engine.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["methods", "-v"]).verbose is True
    assert parser.parse_args(["-v", "methods"]).verbose is True
    assert parser.parse_args(["methods"]).verbose is False


def test_a_missing_or_corrupt_scan_is_not_blamed_on_the_channels(tmp_path) -> None:
    import pytest
    from torch import nn

    from esegeta_engine.errors import VolumeError, VolumeShapeError
    from esegeta_engine.io import load_volume
    from esegeta_engine.models.sources import LoadedModel

    raw = _volume(tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    _volume(tmp_path / "two.nii.gz", (8, 8, 8, 2))
    source = LoadedModel(module=nn.Identity(), source="nnunet", input_note="dataset.json lists 1 input channel(s)")
    for path in (tmp_path / "cut.nii.gz", tmp_path / "none.nii.gz"):
        with pytest.raises(VolumeError) as exc:
            load_volume(path)
        assert not isinstance(exc.value, VolumeShapeError)
        said = source.volume_error(exc.value)
        assert "channel" not in str(said) and said.fix == exc.value.fix
    with pytest.raises(VolumeShapeError) as exc:
        load_volume(tmp_path / "two.nii.gz")
    said = source.volume_error(exc.value)
    assert "dataset.json lists 1 input channel(s)" in said.problem and "channels" in said.fix


def test_one_folds_checkpoint_or_a_bundles_weights_point_to_their_folder(tmp_path) -> None:
    import pytest

    from esegeta_engine.errors import ModelLoadError
    from esegeta_engine.models import load_model

    nn_dir, bundle = tmp_path / "Trainer__Plans__3d_fullres", tmp_path / "spleen"
    (nn_dir / "fold_2").mkdir(parents=True)
    (nn_dir / "plans.json").write_text("{}")
    torch.save({"network_weights": {}}, nn_dir / "fold_2" / "checkpoint_final.pth")
    with pytest.raises(ModelLoadError, match=r"one fold's checkpoint of the nnU-Net model") as exc:
        load_model(nn_dir / "fold_2" / "checkpoint_final.pth")
    assert f"--nnunet {nn_dir}" in exc.value.fix and "--folds 2" in exc.value.fix
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    torch.save({}, bundle / "models" / "model.pt")
    with pytest.raises(ModelLoadError, match="weights of the MONAI bundle") as exc:
        load_model(bundle / "models" / "model.pt")
    assert f"--bundle {bundle}" in exc.value.fix


def test_a_bundles_torchscript_model_still_loads_as_a_model_file(tmp_path) -> None:
    """Review finding: many bundles ship a whole TorchScript model (``models/model.ts``); it was refused as
    "the weights of the MONAI bundle" with no override. A TorchScript file is a model on its own."""
    from torch import nn

    from esegeta_engine.models import load_model

    bundle = tmp_path / "spleen"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    net = nn.Conv3d(1, 2, 3, padding=1).eval()
    torch.jit.script(net).save(str(bundle / "models" / "model.ts"))
    loaded = load_model(bundle / "models" / "model.ts")
    x = torch.randn(1, 1, 4, 4, 4)
    torch.testing.assert_close(loaded(x), net(x))
