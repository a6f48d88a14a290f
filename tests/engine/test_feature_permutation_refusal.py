"""feature_permutation permutes supervoxels across a batch of volumes (issue 20, part 4): with one
volume its map has no meaning, and it has no patch-wise form. Its refusal says exactly that and what to
use instead, under sliding windows (one volume and two) and whole-volume with one volume, 2D and 3D;
the methods it points to run on the same input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import ExecutionConfig, MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer, MapReady
from esegeta_engine.io import Volume
from esegeta_engine.jobs.events import JobFailed
from esegeta_engine.jobs.refusal import refusals


def _net(dims: int) -> nn.Module:
    torch.manual_seed(0)
    C = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(C(1, 3, 3, padding=1), nn.ReLU(), C(3, 2, 1)).eval()


def _run(dims: int, n_volumes: int, sliding: bool):
    shape = (20, 18) if dims == 2 else (12, 10, 9)
    rng = np.random.default_rng(0)
    vols = [Volume(rng.normal(size=shape).astype(np.float32), np.eye(4)) for _ in range(n_volumes)]
    execution = ExecutionConfig(patch_size=[8] * dims, overlap=0.25) if sliding else ExecutionConfig(mode="whole")
    ex = Explainer(_net(dims), PreprocessConfig(spatial_dims=dims), TargetConfig(), execution=execution)
    grid = {"mask": "grid", "grid_size": 4}
    methods = [MethodConfig(name=n, params=grid) for n in ("feature_permutation", "feature_ablation")]
    events = list(ex.iter_explain(vols, methods, threaded=False))
    return ([e for e in events if isinstance(e, JobFailed)], [e for e in events if isinstance(e, MapReady)],
            ex, methods, shape)


def _says_why_and_what_instead(text: str) -> None:
    assert "permutes each supervoxel across a batch of several volumes" in text
    assert "with one volume there is nothing to swap with" in text and "no meaning" in text
    assert "use feature_ablation" in text or "or use feature_ablation" in text
    assert "Traceback" not in text and "hooks store activations" not in text  # not the whole-forward reason


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("n_volumes", [1, 2])
def test_under_sliding_windows_the_refusal_names_the_batch_and_the_alternative(dims: int, n_volumes: int) -> None:
    failed, maps, ex, methods, shape = _run(dims, n_volumes, sliding=True)
    assert {f.job.spec.name for f in failed} == {"feature_permutation"}
    text = str(failed[0].error)
    _says_why_and_what_instead(text)
    assert "no patch-wise form under sliding-window execution" in text
    assert {m.job.spec.name for m in maps} == {"feature_ablation"} and len(maps) == n_volumes  # the alternative ran
    assert all(m.patch_evaluations > 0 for m in maps)
    before = refusals(methods, "argmax_region", ex.execution, shape)  # what front ends show before a run
    assert [name for name, _ in before] == ["feature_permutation"] and str(before[0][1]) == text


@pytest.mark.parametrize("dims", [2, 3])
def test_whole_volume_with_one_volume_is_refused_with_the_same_alternatives(dims: int) -> None:
    failed, maps, *_ = _run(dims, 1, sliding=False)
    assert [f.job.spec.name for f in failed] == ["feature_permutation"]
    text = str(failed[0].error)
    _says_why_and_what_instead(text)
    assert "give several volumes of one shape" in text
    assert [m.job.spec.name for m in maps] == ["feature_ablation"]


@pytest.mark.parametrize("dims", [2, 3])
def test_whole_volume_with_two_volumes_runs(dims: int) -> None:
    failed, maps, *_ = _run(dims, 2, sliding=False)
    assert failed == []
    perm = [m for m in maps if m.job.spec.name == "feature_permutation"]
    assert len(perm) == 2 and any(float(np.abs(m.array).max()) > 0 for m in perm)
