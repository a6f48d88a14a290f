"""Fault matrix, groups 3 and 4 (issue 10): resource bombs in tiny files are refused fast; wrong
results are never reported as ok (NaN maps, strict JSON, complex and RGB volumes)."""

from __future__ import annotations

import json
import time
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.config import load_config
from esegeta_engine.errors import ConfigError, VolumeError
from esegeta_engine.io import load_volume
from esegeta_engine.pipeline import run
from matrix_setup import AFFINE, config, make_case, raw_nifti


@pytest.fixture
def case(tmp_path):
    return make_case(tmp_path)


def _bounded(fn):
    """Run ``fn``; return (its exception, seconds, peak MB traced)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # what is checked is the exception itself
        error = exc
    else:
        error = None
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return error, seconds, peak


def _alias_bomb(levels: int) -> str:
    """A flow list of ``levels`` anchors, each ten aliases of the one before: 10**levels leaves."""
    items = ["&a0 [lol]"] + [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(items) + "]"


BASE = """model: {{path: model.pt, class_path: "tiny_models:TinySegNet", kwargs: {kwargs}}}
volumes: [vol.nii.gz]
methods: [{{name: occlusion, params: {{window: {window}}}}}]
"""


@pytest.mark.parametrize("where", ["parameter", "model.kwargs"])
def test_g3_yaml_alias_bomb_is_refused_fast_and_small(case, where):
    bomb = _alias_bomb(7)  # a few hundred bytes, 10 million values once expanded
    text = BASE.format(kwargs="{dims: 3, lol: %s}" % bomb if where == "model.kwargs" else "{dims: 3}",
                       window=bomb if where == "parameter" else 2)
    path = case / "bomb.yaml"
    path.write_text(text)
    assert path.stat().st_size < 1000
    error, seconds, peak = _bounded(lambda: load_config(path))
    assert isinstance(error, ConfigError), error
    assert peak < 200, (seconds, peak)  # memory is counted; time is benchmarks/bench_limits.py's
    assert len(str(error)) < 2000 and "alias" in error.problem


def test_g3_recursive_alias_is_refused(case):
    path = case / "loop.yaml"
    path.write_text(BASE.format(kwargs="&k {dims: 3, again: *k}", window=2))
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize("name", ["huge.nii.gz", "huge.nii"])
def test_g3_nifti_header_claiming_more_than_the_file_holds_is_refused(tmp_path, name):
    path = raw_nifti(tmp_path / name, (800, 800, 800), AFFINE, data=b"\0" * 10_000)
    assert path.stat().st_size < 12_000
    error, seconds, peak = _bounded(lambda: load_volume(path))
    assert isinstance(error, VolumeError) and "claims (800, 800, 800)" in error.problem, error
    assert peak < 200, (seconds, peak)  # memory is counted; time is benchmarks/bench_limits.py's


def test_g3_honest_compressed_volume_still_loads(tmp_path):
    # zeros compress ~1000-fold: the size bound must not refuse a real (sparse) file
    path = raw_nifti(tmp_path / "zeros.nii.gz", (64, 64, 64), AFFINE)
    assert path.stat().st_size * 200 < 64**3 * 4
    assert load_volume(path).data.shape == (64, 64, 64)


def test_g4_nan_map_is_a_failed_job_and_the_manifest_is_strict_json(case):
    from tiny_models import TinySegNet

    model = TinySegNet(3)
    state = torch.load(case / "model.pt", weights_only=True)
    state["conv2.weight"][0, 0, 1, 1, 1] = float("nan")  # a NaN weight: NaN gradients
    model.load_state_dict(state)
    torch.save(model.state_dict(), case / "nan.pt")
    result = run(config(case, [{"name": "saliency"}], model={"path": "nan.pt"}))
    rec = result.records[0]
    assert rec["status"] == "failed" and "NaN or infinite" in rec["error"] and "file" not in rec
    assert not list((case / "out").glob("vol__saliency*"))

    def refuse(constant):
        raise ValueError(f"bare {constant} in manifest.json")

    json.loads((case / "out" / "manifest.json").read_text(), parse_constant=refuse)


def test_g4_manifest_never_holds_bare_nan(tmp_path):
    from esegeta_engine.io import write_json

    write_json({"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": {"d": -np.inf}}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_g4_complex_volume_is_refused_and_named(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6), np.complex64) * (1 + 2j), AFFINE), tmp_path / "c.nii.gz")
    with pytest.raises(VolumeError, match="complex-valued"):
        load_volume(tmp_path / "c.nii.gz")


def test_g4_rgb_volume_is_refused_and_named(tmp_path):
    rgb = np.zeros((6, 6, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, AFFINE), tmp_path / "rgb.nii.gz")
    with pytest.raises(VolumeError, match="RGB colour"):
        load_volume(tmp_path / "rgb.nii.gz")
