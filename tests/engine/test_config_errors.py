"""Configuration errors a new user meets: a misspelt value gets its close allowed value, a misspelt key one line."""

from __future__ import annotations

import pytest

from esegeta_engine.config import parse_config
from esegeta_engine.errors import ConfigError

BASE = {"model": {"path": "net.pt"}, "volumes": ["v.nii.gz"], "methods": [{"name": "saliency"}]}


@pytest.mark.parametrize("section, key, typo, meant", [
    ("target", "kind", "argmx", "argmax"),
    ("preprocess", "normalisation", "zscor", "zscore"),
    ("target", "outcome", "fpp", "fp"),
])
def test_a_misspelt_value_names_the_close_allowed_value(section, key, typo, meant) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({**BASE, section: {key: typo}})
    line = next(x for x in exc.value.problem.splitlines() if f"{section}.{key}" in x)
    assert f"'{typo}' is not allowed; did you mean '{meant}'?" in line


def test_a_value_far_from_any_gets_the_list_only() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({**BASE, "target": {"kind": "banana"}})
    assert "did you mean" not in exc.value.problem and "'argmax'" in exc.value.problem


def test_a_misspelt_required_key_is_one_line() -> None:
    data = {k: v for k, v in BASE.items() if k != "volumes"}
    with pytest.raises(ConfigError) as exc:
        parse_config({**data, "volume": ["v.nii.gz"]})
    lines = exc.value.problem.splitlines()[1:]
    assert len(lines) == 1 and "volume: unknown key; did you mean 'volumes'?" in lines[0]
    with pytest.raises(ConfigError) as exc:  # missing with no misspelling: said, in words
        parse_config(data)
    assert exc.value.problem.splitlines()[1:] == ["  volumes: missing (required)"]


def test_one_volume_written_without_a_list_is_that_volume(tmp_path) -> None:
    cfg = parse_config({**BASE, "volumes": "v.nii.gz"}, base=tmp_path)
    assert cfg.volumes == [tmp_path / "v.nii.gz"]
