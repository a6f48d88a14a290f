"""The one bounded config reader: alias bombs, deep nesting and oversize files refused before parsing."""

from __future__ import annotations

import tracemalloc

import pytest
import yaml

from esegeta_engine import cli, yamlsafe
from esegeta_engine.cohort.config import load_cohort_config
from esegeta_engine.config import load_config
from esegeta_engine.errors import ConfigError
from esegeta_engine.yamlsafe import MAX_BYTES, MAX_DEPTH, load_bounded, read_config_file


def _bomb(levels: int = 9) -> str:
    """Nine anchors of nine aliases each: ~450 bytes, 9**9 (387 million) values once expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\nmodels: *a%d\ncohort: {glob: '*.nii.gz'}\n" % (levels - 1)


@pytest.fixture
def composed(monkeypatch):
    """Counts every YAML node composed and every document constructed (expansion happens there)."""
    counts = {"nodes": 0, "documents": 0}
    compose, construct = yaml.SafeLoader.compose_node, yaml.SafeLoader.construct_document

    def counting_compose(self, parent, index):
        counts["nodes"] += 1
        return compose(self, parent, index)

    def counting_construct(self, node):
        counts["documents"] += 1
        return construct(self, node)

    monkeypatch.setattr(yaml.SafeLoader, "compose_node", counting_compose)
    monkeypatch.setattr(yaml.SafeLoader, "construct_document", counting_construct)
    return counts


@pytest.mark.parametrize("reader", [load_config, load_cohort_config, read_config_file])
def test_alias_bomb_is_refused_before_any_node_is_built(tmp_path, composed, reader):
    path = tmp_path / "cohort.yaml"
    path.write_text(_bomb())
    assert path.stat().st_size < 600
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as info:
            reader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert composed == {"nodes": 0, "documents": 0}  # refused on the event stream, nothing expanded
    assert peak < 5_000_000, peak
    assert "aliases" in info.value.problem and str(yamlsafe.MAX_NODES) in info.value.problem


def test_cli_run_refuses_a_cohort_alias_bomb_with_one_line(tmp_path, composed, capsys):
    path = tmp_path / "cohort.yaml"
    path.write_text(_bomb())
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: cohort.yaml is too large") and "fix:" in err
    assert composed == {"nodes": 0, "documents": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.yaml"]  # nothing written


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("reader", [load_config, load_cohort_config])
def test_deep_nesting_is_refused_with_the_limit(tmp_path, suffix, reader):
    deep = "[" * 20_000 + "]" * 20_000
    path = tmp_path / f"deep{suffix}"
    path.write_text(f'{{"model": {deep}}}' if suffix == ".json" else f"model: {deep}\n")
    assert path.stat().st_size < 41_000
    with pytest.raises(ConfigError) as info:
        reader(path)
    assert f"more than {MAX_DEPTH} levels" in info.value.problem


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_deep_block_nesting_is_refused(tmp_path, suffix):
    if suffix == ".yaml":
        text = "".join(" " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)) + " " * (MAX_DEPTH + 5) + "v\n"
    else:
        text = '{"k": ' * (MAX_DEPTH + 5) + "1" + "}" * (MAX_DEPTH + 5)
    with pytest.raises(ConfigError, match="levels deep"):
        load_bounded(text, json_syntax=suffix == ".json")


def test_nesting_within_the_limit_and_brackets_in_strings_are_fine():
    ok = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert load_bounded(f"a: {ok}")["a"] is not None
    brackets = "[" * (MAX_DEPTH + 10)
    assert load_bounded(f'{{"a": "{brackets}"}}', json_syntax=True) == {"a": brackets}
    assert load_bounded(f"a: '{brackets}'") == {"a": brackets}
    assert load_bounded("a: &x [1, 2]\nb: *x\nc: {<<: {k: 1}}\n") == {"a": [1, 2], "b": [1, 2], "c": {"k": 1}}


def test_oversize_file_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    path = tmp_path / "big.yaml"
    path.write_text("a: 1\n" + "#" * (MAX_BYTES + 10) + "\n")
    with pytest.raises(ConfigError) as info:
        read_config_file(path)
    assert str(MAX_BYTES) in info.value.problem


def test_recursive_alias_is_refused():
    with pytest.raises(ConfigError, match="contains itself"):
        load_bounded("a: &k {dims: 3, again: *k}\n")


def test_json_value_count_is_bounded():
    with pytest.raises(ConfigError, match="too large"):
        load_bounded("[" + ",".join(["1"] * (yamlsafe.MAX_NODES + 5)) + "]", json_syntax=True)


def test_evaluate_reads_a_received_runs_manifest_within_the_depth_bound(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"config": ' + "[" * 20_000 + "]" * 20_000 + ', "results": []}')
    before = (run_dir / "manifest.json").stat().st_mtime_ns
    assert cli.main(["evaluate", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"more than {MAX_DEPTH} levels" in err
    assert (run_dir / "manifest.json").stat().st_mtime_ns == before
