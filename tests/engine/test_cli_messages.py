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
