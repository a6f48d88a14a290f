"""Fault matrix, group 1 (issue 10): a received config cannot make pickled code run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from esegeta_engine.cli import main
from esegeta_engine.config import load_config
from esegeta_engine.errors import ConfigError, ModelLoadError
from matrix_setup import config_dict, make_case


class _Payload:
    """Unpickling this writes a marker file: the stand-in for an attacker's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pickled code ran",))


@pytest.fixture
def received(tmp_path):
    """A model file with a payload and a config that asks to trust it, as someone might send them."""
    make_case(tmp_path)
    marker = tmp_path / "MARKER"
    torch.save(_Payload(marker), tmp_path / "evil.pt")
    cfg = config_dict(model={"path": "evil.pt", "format": "pickled_module", "trust_pickled": True,
                             "class_path": None})
    (tmp_path / "received.yaml").write_text(yaml.safe_dump(cfg))
    plain = config_dict(model={"path": "evil.pt", "class_path": None}, output={"dir": "out2"})
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    return tmp_path, marker


def test_g1_config_key_trust_pickled_is_refused_and_runs_nothing(received, capsys):
    tmp_path, marker = received
    with pytest.raises(ConfigError, match="--trust-pickled"):
        load_config(tmp_path / "received.yaml")
    assert main(["run", str(tmp_path / "received.yaml")]) == 2
    assert "trust_pickled cannot be set in a config" in capsys.readouterr().err
    assert not marker.exists()


def test_g1_received_model_without_the_flag_runs_nothing(received, capsys):
    tmp_path, marker = received
    assert main(["run", str(tmp_path / "plain.yaml")]) == 2
    err = capsys.readouterr().err
    assert "pickled" in err and "--trust-pickled" in err and "Traceback" not in err
    assert not marker.exists()


def test_g1_the_person_running_the_command_can_trust_the_file(received, capsys):
    # the control: the payload is real, so the refusals above are meaningful
    tmp_path, marker = received
    main(["run", str(tmp_path / "plain.yaml"), "--trust-pickled", "-q"])
    assert marker.read_text() == "pickled code ran"


def test_g1_load_model_needs_the_explicit_argument(received):
    from esegeta_engine.models import load_model

    tmp_path, marker = received
    with pytest.raises(ModelLoadError, match="--trust-pickled"):
        load_model(tmp_path / "evil.pt", format="pickled_module")
    assert not marker.exists()


def test_g1_docs_say_a_class_path_imports_its_module():
    from esegeta_engine.models import import_class, load_model

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "import-time code" in readme and "--trust-pickled" in readme
    assert "import-time code" in import_class.__doc__ and "imported" in load_model.__doc__
