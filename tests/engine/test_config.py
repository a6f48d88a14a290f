"""The config model: unknown keys and bad values named, registry-checked methods, paths."""

from __future__ import annotations

import pytest

from esegeta_engine.config import load_config, parse_config
from esegeta_engine.errors import ConfigError

BASE = {"model": {"path": "m.pt"}, "volumes": ["v.nii.gz"], "methods": [{"name": "saliency"}]}


def cfg(**over):
    data = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in BASE.items()}
    data.update(over)
    return data


def test_minimal_config_defaults():
    c = parse_config(cfg())
    assert c.target.kind == "argmax" and c.preprocess.spatial_dims == 3 and c.run.seed == 0


def test_unknown_key_is_named_with_allowed_keys():
    with pytest.raises(ConfigError) as info:
        parse_config(cfg(target={"kind": "argmax", "clases": [1]}))
    msg = str(info.value)
    assert "target.clases: unknown key" in msg and "classes" in msg
    assert "did you mean 'classes'?" in msg
    with pytest.raises(ConfigError) as info:
        parse_config(cfg(target={"kind": "argmax", "xyzzy": 1}))
    assert "did you mean" not in str(info.value)  # nothing close: only the allowed keys


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"target.kind: .*'argmax'.*'otsu'"):
        parse_config(cfg(target={"kind": "threshold"}))


def test_unknown_method_and_bad_parameter():
    with pytest.raises(ConfigError, match="unknown method 'salency'.*did you mean saliency"):
        parse_config(cfg(methods=[{"name": "salency"}]))
    with pytest.raises(ConfigError, match="n_steps"):
        parse_config(cfg(methods=[{"name": "integrated_gradients", "params": {"n_steps": 0}}]))
    with pytest.raises(ConfigError, match="no parameter 'steps'"):
        parse_config(cfg(methods=[{"name": "integrated_gradients", "params": {"steps": 3}}]))


def test_layer_methods_need_layers():
    with pytest.raises(ConfigError, match="needs layers"):
        parse_config(cfg(methods=[{"name": "layer_gradcam"}]))
    with pytest.raises(ConfigError, match="does not take layers"):
        parse_config(cfg(methods=[{"name": "saliency", "layers": ["conv1"]}]))


def test_target_requirements_and_axis_order():
    with pytest.raises(ConfigError, match="roi_mask"):
        parse_config(cfg(target={"kind": "roi"}))
    with pytest.raises(ConfigError, match="axis_order"):
        parse_config(cfg(preprocess={"axis_order": "xxy"}))
    with pytest.raises(ConfigError, match="spatial_dims"):
        parse_config(cfg(preprocess={"axis_order": "xy"}))


def test_yaml_file_relative_paths(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model: {path: models/m.pt}\nvolumes: [data/v.nii.gz]\nmethods:\n  - name: saliency\n")
    c = load_config(tmp_path / "c.yaml")
    assert c.model.path == tmp_path / "models" / "m.pt"
    assert c.volumes[0] == tmp_path / "data" / "v.nii.gz"


def test_bad_syntax_and_missing_file(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "c.json")
    (tmp_path / "c.yaml").write_text("model: {path: m.pt\nvolumes: [v.nii.gz]\n")  # an unclosed brace
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in exc.value.problem  # one line: where, and what the parser expected
    assert "c.yaml is not valid YAML: line 2, column 8: expected ',' or '}'" in exc.value.problem
    assert "starts at line 1, column 8" in exc.value.problem
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_no_eval_of_strings():
    # A config string that would do something if eval()ed is just an unknown layer name / class path.
    c = parse_config(cfg(methods=[{"name": "layer_gradcam", "layers": ["__import__('os').system('false')"]}]))
    assert c.methods[0].layers[0].startswith("__import__")
