"""Each job gets its own input tensor: a failed job leaves no state behind for the next (issue #18,
part 6); and the executors behind one ``map`` seam give the same outcomes (issue #15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
from esegeta_engine.explain import Explainer, JobFailed, MapReady
from esegeta_engine.io import Volume

from tiny_models import TinySegNet


class NeedsPlainInput(nn.Module):
    """A segmentation net that reads its input through NumPy: it cannot run with input gradients."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.net = TinySegNet(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = torch.from_numpy(x.numpy().copy())  # raises when x requires grad
        return self.net(plain)


def _explain(model: nn.Module, volume: Volume, methods: list[MethodConfig]) -> list:
    explainer = Explainer(model, PreprocessConfig(spatial_dims=volume.data.ndim, normalisation="none"),
                          TargetConfig(kind="argmax", classes=[1]))
    return [e for e in explainer.iter_explain([volume], methods, threaded=False)
            if isinstance(e, (MapReady, JobFailed))]


@pytest.mark.parametrize("shape", [(10, 9), (8, 7, 6)], ids=["2d", "3d"])
def test_a_failed_method_does_not_spoil_the_next(shape):
    torch.manual_seed(0)
    model = NeedsPlainInput(len(shape)).eval()
    data = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    volume = Volume(data, np.eye(4))
    occlusion = MethodConfig(name="occlusion", params={"window": 3})
    events = _explain(model, volume, [MethodConfig(name="saliency"), occlusion])
    assert isinstance(events[0], JobFailed) and "numpy" in events[0].error.lower()
    assert isinstance(events[1], MapReady)  # it failed before the fix: the input required grad
    alone = _explain(model, volume, [occlusion])
    assert isinstance(alone[0], MapReady)
    assert np.array_equal(events[1].array, alone[0].array)
    assert not any(p.grad is not None for p in model.parameters())


def test_device_pool_gives_the_inline_outcomes(tmp_path):
    from esegeta_engine.cohort import parse_cohort_config, plan_cohort
    from esegeta_engine.cohort.run import job_specs
    from esegeta_engine.jobs.executors import DevicePool, InlineExecutor

    from jobs_helpers import cohort_data, model_file, volume_file

    volumes = [volume_file(tmp_path, f"s{i}.nii.gz", seed=i) for i in range(3)]
    cfg = parse_cohort_config(cohort_data({"m": model_file(tmp_path)}, volumes, tmp_path / "out"))
    plan = plan_cohort(cfg)
    specs = job_specs(cfg, plan, plan.jobs)
    inline = {o.key: o for o in InlineExecutor().map(specs)}
    pool = DevicePool(["cpu", "cpu"])
    pooled = {o.key: o for o in pool.map(specs)}
    pool.close()
    assert set(inline) == set(pooled) == {j.key for j in plan.jobs} and len(inline) == 6
    for key, o in inline.items():
        assert o.status == pooled[key].status == "ok"
        assert np.array_equal(o.array, pooled[key].array)
